// Python module shell for the prebuilt extension `repblend_fast._C`.
// The ops themselves register with the dispatcher (TORCH_LIBRARY_FRAGMENT in each op's .cu file),
// so importing this module is enough to make torch.ops.repblend_fast.* available.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "repblend_fast CUDA ops (registered as torch.ops.repblend_fast.*)";
}
