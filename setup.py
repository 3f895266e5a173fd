"""Build script: the package plus its C++ launch fast path (a torch extension).

Build with `pip install --no-build-isolation -e .` after the pinned runtime
dependencies (requirements.txt) are installed: the extension compiles against
the torch already in the environment.  A wheel (`pip wheel --no-build-isolation
--no-deps .`) holds the same files: the C++ sources (torch_xegpu_attn/csrc/,
from which the CUDA and XPU launchers are built at their first use) and
the xegpu emulation's OpenCL C are package data.
"""

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# Every source the package's cache keys hash (cache.SOURCE_SUFFIXES) ships: the Python modules
# as packages, the rest as package data.
PACKAGE_DATA = ["**/*.cpp", "**/*.h", "**/*.cl"]

setup(
    packages=find_packages(include=["torch_xegpu_attn", "torch_xegpu_attn.*"]),
    package_data={"torch_xegpu_attn": PACKAGE_DATA},
    ext_modules=[
        CppExtension(
            name="torch_xegpu_attn._C",
            sources=["torch_xegpu_attn/csrc/cpu_launcher.cpp", "torch_xegpu_attn/csrc/op.cpp"],
            # at::parallel_for is header code: without OpenMP here it runs serially.
            # The soname libgomp.so.1 resolves to the copy torch already loaded.
            extra_compile_args=["-O2", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
