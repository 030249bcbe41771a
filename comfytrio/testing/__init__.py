"""The fake ComfyUI server (in progress)."""
