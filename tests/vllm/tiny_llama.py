"""A small random-weights Llama for the parallel tests: 4 query / 2 KV heads of dim 64 and 4
layers, so that tensor parallelism 2 splits its heads and pipeline parallelism 2 its layers
(SmolLM2's 9 / 3 heads do not split in two). Saved with SmolLM2's tokenizer, so prompts are text.

Weights are drawn wider than a trained model's (std 0.1): attention is peaked rather than nearly
uniform (a wrong key or head shows in the output), and the logits of a step are far enough apart
that float32 rounding differences between two correct backends do not flip a greedy token."""
from pathlib import Path

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 64, 4


def save_tiny_llama(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chunkvale.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HEADS * HEAD_DIM, intermediate_size=512,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, max_position_embeddings=1024, initializer_range=0.1,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
