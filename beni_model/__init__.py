import os

# transformers (5.25 and later) loads models with `use_kernels` on by default, which fetches kernels from the hub at
# load time: offline that fails (or asks to trust remote code). beni runs offline, so hub kernels are off unless the
# user turns them on (USE_HUB_KERNELS=1).
os.environ.setdefault("USE_HUB_KERNELS", "0")
