from setuptools import find_packages, setup

setup(
    name="ghmpi",
    version="0.1.0",
    description="Offline LLM batch inference over MPI with attention offloaded from GPUs to CPU ranks",
    python_requires=">=3.11",
    packages=find_packages(include=["ghmpi", "ghmpi.*"]),
    # the native kernels are compiled from these at first use, on the machine that runs them
    package_data={"ghmpi.kernels": ["*.cpp", "*.h"]},
    install_requires=[
        "mpi4py>=3.1",
        "torch>=2.1",
        "numpy",
        "h5py",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "transformers",  # prepare/export: the model folder's tokenizer and chat template
        "jinja2",
        "ninja",  # torch.utils.cpp_extension builds the native CPU attention kernel with it
    ],
    extras_require={
        "test": ["pytest", "pytest-mpi", "transformers"],
    },
    entry_points={"console_scripts": ["ghmpi=ghmpi.cli:main"]},
)
