import platform
import sys

from setuptools import Extension, setup

# Winograd transforms in C (layers/_winograd.c, AVX2/FMA, loaded with ctypes; optional: without a
# compiler, or off x86-64, layers/winograd.py computes them with torch operators instead)
EXT = []
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
    EXT.append(Extension("darknet_cfg.layers._winograd", sources=["layers/_winograd.c"],
                         extra_compile_args=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                         extra_link_args=["-fopenmp"], optional=True))
    # the int8 path's input quantization (layers/_quantize.c; without it layers/quantized.py
    # runs a compiled torch kernel, same bytes)
    EXT.append(Extension("darknet_cfg.layers._quantize", sources=["layers/_quantize.c"],
                         extra_compile_args=["-O3", "-mavx2", "-fopenmp"],
                         extra_link_args=["-fopenmp"], optional=True))
    # NMS with thousands of boxes (layers/_nms.c; without it darknet_cfg/infer.py's numpy path,
    # same results). No fused multiply-adds: the IoU must round as numpy's does.
    EXT.append(Extension("darknet_cfg.layers._nms", sources=["layers/_nms.c"],
                         extra_compile_args=["-O3", "-ffp-contract=off", "-fopenmp"],
                         extra_link_args=["-fopenmp"], optional=True))

setup(
    name="darknet_cfg",
    version="0.1.0",
    description="Darknet-compatible cfg interpreter and .weights converter for PyTorch",
    python_requires=">=3.9",
    packages=["darknet_cfg", "darknet_cfg.zoo", "darknet_cfg.layers", "darknet_cfg.converters",
              "darknet_cfg.cfg"],
    package_dir={
        "darknet_cfg": "darknet_cfg",
        "darknet_cfg.layers": "layers",
        "darknet_cfg.converters": "converters",
        "darknet_cfg.cfg": "cfg",
    },
    package_data={"darknet_cfg.cfg": ["*.cfg"]},
    ext_modules=EXT,
    # lower bounds: the versions the test suite ran on (README, "Tested versions")
    install_requires=["numpy>=2.2", "torch>=2.11", "click>=8.2", "tqdm>=4.66"],
    extras_require={
        "test": ["pytest>=8.0"],
        "vision": ["opencv-python-headless>=4.12,<5", "pillow>=10.0"],  # OpenCV 5: no Darknet
        "eval": ["pycocotools>=2.0.8"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.19", "onnxscript>=0.6"],
    },
    entry_points={
        "console_scripts": [
            "darknet2torch=darknet_cfg.cli:darknet2torch",
            "torch2darknet=darknet_cfg.cli:torch2darknet",
            "darknet-cfg=darknet_cfg.cli:main",
        ]
    },
)
