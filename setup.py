"""Build script: the package plus its C++ launch fast path (a torch extension).

Build with `pip install --no-build-isolation -e .` after the pinned runtime
dependencies (requirements.txt) are installed: the extension compiles against
the torch already in the environment.
"""

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    packages=find_packages(include=["torch_xegpu_attn", "torch_xegpu_attn.*"]),
    ext_modules=[
        CppExtension(
            name="torch_xegpu_attn._C",
            sources=["csrc/cpu_launcher.cpp", "csrc/op.cpp"],
            # at::parallel_for is header code: without OpenMP here it runs serially.
            # The soname libgomp.so.1 resolves to the copy torch already loaded.
            extra_compile_args=["-O2", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
