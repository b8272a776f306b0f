#include "attention_launch.cuh"

CHUNKVALE_DEFINE_ATTENTION_LAUNCH(launch_attention_f16, __half)
