from setuptools import find_packages, setup

setup(
    name="megatron_mm",
    version="0.1.0",
    description="Multimodal 3D-parallel pretraining (MoE + MLA) on megatron-core",
    packages=find_packages(include=["megatron_mm", "megatron_mm.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Any torch the cluster already has (NGC containers bring their own); CPU machines
        # install exact pins from constraints-cpu.txt so pip never resolves torch itself.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "matplotlib",  # tools/ablate.py's plot
        "numpy",
        "pillow",
        "protobuf",  # sentencepiece's ModelProto: extending an existing tokenizer (tools/prepare_multimodal.py)  # demo images; image checks in build_shards; the PyTorch media loader
        "psutil",  # megatron-core dist_checkpointing writer workers need it
        "pyyaml",
        "scipy",  # audio resampling in the PyTorch media loader
        "sentencepiece",
        "soundfile",  # WAV/FLAC read and write (bundles libsndfile)
        "tensorboard",
        "webdataset",  # multimodal shards
    ],
    extras_require={
        # DALI reads the multimodal shards (on the GPU when there is one, else its CPU pipeline).
        "dali": ["nvidia-dali-cuda120"],
        "gpu": ["transformer-engine[pytorch]>=2.6", "nvidia-dali-cuda120"],
        # triton: the kernels/ tests run its CPU interpreter (GPU machines have the triton their torch
        # needs); accelerate: transformers' FP8 loader, which tests/test_fp8_blockwise.py compares against.
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "nvidia-dali-cuda120", "transformers>=5.24,<6", "safetensors",
                "protobuf", "triton; platform_system == 'Linux'", "accelerate",
                "nvidia-cuda-cuobjdump"],  # tools/te_bundle.py verify checks its listing against cuobjdump's
        # Loading converted folders (megatron_mm.conversion.hf_model) and checking conversions
        # (tools/verify_hf.py); the converters themselves need neither.
        "hf": ["transformers>=5.24,<6", "safetensors", "protobuf"],
    },
)
