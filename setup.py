"""Packaging: `kernels/` at the top level installs as the subpackage `fastsr.kernels`, and
`csrc/` (C++ sources only) as `fastsr/csrc`, where fastsr.ext finds them to build on first use,
and `configs/` (training TOML files) as `fastsr/configs`.

Metadata lives in pyproject.toml; this file only says where the packages are, because
the user's layout keeps the Triton kernels beside (not inside) the package.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastsr", "fastsr.*"]) + ["fastsr.kernels", "fastsr.csrc", "fastsr.configs"]

setup(
    packages=packages,
    # csrc/ (the C++ sources fastsr.ext compiles on first use) installs as fastsr/csrc/, as
    # data only: nothing is built at install time.
    # configs/ (the training configs) installs as fastsr/configs/, where `fastsr train -c NAME`
    # finds them by name.
    package_dir={"fastsr.kernels": "kernels", "fastsr.csrc": "csrc", "fastsr.configs": "configs"},
    package_data={"fastsr": ["weights/*.safetensors", "weights/*.md"], "fastsr.csrc": ["*.cpp", "*.h"],
                  "fastsr.configs": ["*.toml"]},
    include_package_data=True,
)
