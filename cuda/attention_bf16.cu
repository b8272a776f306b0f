#include "attention_launch.cuh"

CHUNKVALE_DEFINE_ATTENTION_LAUNCH(launch_attention_bf16, __nv_bfloat16)
