"""obert-modifiers: oBERT pruning, layer dropping, QAT and distillation as SparseML recipe modifiers."""

import os
import re

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
# The start-up hook: a .pth file at the root of site-packages that makes every Python process
# register our recipe tags the moment SparseML's PyTorch modifiers are imported (see
# obert_modifiers/_hook.py). It costs one tiny import per interpreter start, no torch, no SparseML.
PTH_NAME = "obert_modifiers_hook.pth"


class BuildPyWithHook(build_py):
    """Ship the start-up .pth file beside the package (the way setuptools ships its own .pth)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        self.copy_file(os.path.join(HERE, "obert_modifiers", PTH_NAME), target, preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithHook(editable_wheel):
    """``pip install -e``: editable wheels carry only a path .pth, so add the hook at the wheel root.

    ``_install_namespaces`` is the step where setuptools (64-80) writes extra files into the wheel's
    root; we add ours there. Fail loudly rather than install a package whose tags silently do not
    register.
    """

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        self.copy_file(os.path.join(HERE, "obert_modifiers", PTH_NAME), os.path.join(installation_dir, PTH_NAME))


def read_version() -> str:
    with open(os.path.join(HERE, "obert_modifiers", "version.py")) as handle:
        return re.search(r'__version__ = "([^"]+)"', handle.read()).group(1)


with open(os.path.join(HERE, "README.md")) as handle:
    long_description = handle.read()

setup(
    name="obert-modifiers",
    version=read_version(),
    description=(
        "Optimal BERT Surgeon pruning, layer dropping, QAT and distillation as SparseML recipe modifiers"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["obert_modifiers", "obert_modifiers.*"]),
    package_data={
        "obert_modifiers": ["*.pth", "recipes/*.yaml", "_metric_scripts/*.py", "zoo/templates/*", "zoo/static/*"]
    },
    include_package_data=True,
    cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook},
    # The base install is light (the recipe engine, the parameter models, the CLI): no torch, no SparseML.
    # A training stack comes as an extra, one of two that cannot share an environment (constraints.txt
    # vs constraints-modern.txt): [sparseml] is the SparseML 1.8 stack `make venv` installs, [modern] is
    # today's torch/transformers 5/numpy 2 stack `make venv-modern` installs; it never pulls SparseML.
    install_requires=[
        "pydantic>=2",
        "pyyaml",
        "typer>=0.12",
        "click",  # cli.py uses it directly (typer no longer depends on it)
        "rich>=13",
        "tqdm",
    ],
    extras_require={
        "sparseml": [
            "torch>=2.3",
            "sparseml[transformers]==1.8.0",
            "sparsezoo==1.8.1",
            "transformers>=4.40,<4.41",
            "datasets>=2.18,<2.19",
            "accelerate>=0.20.3,<0.29",
            "onnx>=1.14,<1.15",
            "onnxruntime>=1.16",
            "pandas<3",
            "pydantic>=2,<2.8",
            "matplotlib",
        ],
        "modern": [
            "torch>=2.13",
            "transformers>=5,<6",
            "accelerate>=1",
            "safetensors",
            "numpy>=2",
            "onnx>=1.17",
            "onnxruntime>=1.20",
        ],
        "test": ["pytest", "pytest-timeout", "pytest-xdist"],
        "deepsparse": ["deepsparse==1.8.0"],
        "hub": [
            "fastapi",
            "uvicorn",
            "sqlalchemy>=2",
            "graphql-core>=3.2",
            "python-multipart",
            "httpx",
            "markdown",
            "jinja2",
            "uvloop",
            "httptools",
            "boto3",
        ],
        "postgres": ["psycopg[binary]"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "ruff", "schemathesis", "playwright", "moto[server]"],
    },
    entry_points={"console_scripts": ["obert=obert_modifiers.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
