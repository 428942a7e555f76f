"""
Vespa: any HTTP inference server (vLLM, TGI, Ollama, llama.cpp, ComfyUI, ...) as a
Vast.ai serverless worker, built on Twisted.
"""

__version__ = "0.2.0"
