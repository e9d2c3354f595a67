"""Triton kernels of repblend_fast, installed as ``repblend_fast.kernels``.

Each module imports triton at its own import time; nothing here is imported by ``import
repblend_fast`` (the dispatcher imports a kernel module only when it runs it).
"""
