"""Models: `loading` reads any local checkpoint (a real Qwen2.5-VL or the tiny one); `tiny` builds the tiny one."""
