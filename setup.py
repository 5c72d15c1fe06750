"""tinyvila: a small, fast runtime for quantized vision-language models.

The folders kernels/, quant/, models/ and tools/ install as tinyvila.kernels, tinyvila.quant,
tinyvila.models and tinyvila.tools, so no generic top-level name lands in site-packages.
"""
from setuptools import setup

setup(
    name="tinyvila",
    version="0.1.0",
    description="Quantized vision-language models with decoupled visual sparsity, fast on one GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tinyvila", "tinyvila.kernels", "tinyvila.quant", "tinyvila.models", "tinyvila.tools"],
    package_dir={
        "tinyvila": "tinyvila",
        "tinyvila.kernels": "kernels",
        "tinyvila.quant": "quant",
        "tinyvila.models": "models",
        "tinyvila.tools": "tools",
    },
    install_requires=[
        # Any torch >= 2.4 works; installing torch first (CPU or CUDA build) keeps pip from
        # replacing it.
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "safetensors>=0.4",
        "numpy",
        "sentencepiece",
        "tokenizers>=0.19",
        "jinja2>=3.1",
        "pillow>=10",
        "decord; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "huggingface_hub",
        "tqdm>=4.61",  # delay= (loader.progress_bar)
    ],
    extras_require={
        # transformers is the reference the tests compare against; the runtime never imports it.
        # protobuf lets transformers read a bare sentencepiece tokenizer.model.
        "test": ["transformers>=5.0", "protobuf", "pytest>=8", "av", "matplotlib", "starlette>=0.37", "uvicorn>=0.29",
                 "httptools>=0.6", "openai>=1.0"],
        # tinyvila-serve's HTTP stack (uvicorn parses HTTP with httptools when it is installed: a
        # request carrying megabytes of images is read faster than by its pure-Python parser).
        "serve": ["starlette>=0.37", "uvicorn>=0.29", "httptools>=0.6"],
        # tinyvila-eval's plots and tinyvila-bench --plot.
        "eval": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "tinyvila-chat = tinyvila.chat:main",
            "tinyvila-demo = tinyvila.demo:main",
            "tinyvila-serve = tinyvila.serve:main",
            "tinyvila-bench = tinyvila.tools.bench:main",
            "tinyvila-quantize = tinyvila.tools.quantize:main",
            "tinyvila-quant-check = tinyvila.tools.quant_check:main",
            "tinyvila-eval = tinyvila.tools.eval:main",
            "tinyvila-eval-data = tinyvila.tools.eval_data:main",
        ]
    },
)
