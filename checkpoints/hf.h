// Export to (and import from) the Hugging Face `transformers` layout: a directory that
// AutoModelForCausalLM.from_pretrained loads with no custom code.
//   dense models        -> model_type "llama"   (LlamaForCausalLM)
//   learned-top-k MoE   -> model_type "mixtral" (MixtralForCausalLM): every layer an MoE layer
// Files: config.json, model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json past
// the shard size), tokenizer.model (the SentencePiece model) and tokenizer_config.json (LlamaTokenizer).
//
// Name mapping (ours -> transformers; l = layer, e = expert):
//   tok_emb.weight                -> model.embed_tokens.weight
//   layers.l.attn_norm.weight     -> model.layers.l.input_layernorm.weight
//   layers.l.attn.wq / wk         -> model.layers.l.self_attn.q_proj / k_proj.weight, rows permuted per head
//   layers.l.attn.wv / wo         -> model.layers.l.self_attn.v_proj / o_proj.weight
//   layers.l.ffn_norm.weight      -> model.layers.l.post_attention_layernorm.weight
//   layers.l.ffn.w_gate/w_up/w_down -> model.layers.l.mlp.gate_proj / up_proj / down_proj.weight     (llama)
//   layers.l.ffn.router.weight    -> model.layers.l.block_sparse_moe.gate.weight                       (mixtral)
//   layers.l.ffn.experts.w_gate[e] / w_up[e] / w_down[e]
//                                 -> model.layers.l.block_sparse_moe.experts.e.w1 / w3 / w2.weight     (mixtral)
//   final_norm.weight             -> model.norm.weight
//   lm_head.weight                -> lm_head.weight (absent when tied: tie_word_embeddings)
// Rotary embeddings: ours rotate interleaved pairs (2i, 2i+1) of each head, transformers' rotate halves (i, i+D/2)
// with the same frequencies, so the rows of q_proj and k_proj are permuted per head: row j of the half layout is
// our row 2j, row D/2 + j our row 2j + 1 (the scores q.k are unchanged). Mixtral renormalises the top-k gates and
// is dropless, as our inference is.
//
// Refused, naming the layer and the reason: word-expert layers, GELU activations or expert biases (llama and
// mixtral use SwiGLU without biases), LayerNorm, mixed dense and MoE layers (mixtral has no dense layers), sigmoid
// router scores, un-normalised top-k gates or a load-balancing selection bias (model.moe.bias_balancing).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "checkpoints/convert.h"

namespace moe::ckpt {

struct HfModel {
  std::string config_json;           // config.json
  std::vector<NamedTensor> tensors;  // transformers names and layouts, in model order
  std::string tokenizer;             // tokenizer.model (SentencePiece) bytes
  std::string tokenizer_config_json;
};

// Pure: the transformers form of a checkpoint's parameters (f32 or bf16 as stored); throws (naming the layer and
// the reason) for a model the target cannot express.
HfModel to_hf(const CheckpointValue& c);

// Writes `dir` (must not exist or be empty) atomically: everything into dir.tmp, fsynced, then renamed. Tensors
// go into model.safetensors, or into shards of at most shard_bytes each plus model.safetensors.index.json.
void write_hf(const std::string& dir, const HfModel& m, int64_t shard_bytes = int64_t(2) << 30);

// Import, the inverse mapping (q/k rows back to interleaved rotary pairs, mixtral experts stacked into [E, ...]).
// Pure: a step-0 checkpoint value without optimizer state from config.json's text, the tensors by transformers
// name and the tokenizer.model bytes. model_type must be llama or mixtral, hidden_act silu, no attention bias, no
// rope scaling; the model fields come from config.json, the other subsystems get placeholder values to be set
// with --set (data.seq_len = max_position_embeddings, data.batch_size 8, optimizer.lr 3e-4, train.steps 1000).
// Every tensor the model needs must be present with its shape, and no other (errors name the tensor).
CheckpointValue from_hf(const HfModel& m, const std::string& source);
// Reads DIR (config.json, model.safetensors or model.safetensors.index.json and its shards, tokenizer.model) into
// an HfModel (config and tokenizer text, tensors by transformers name); errors name the missing or broken file.
// The tokenizer must be SentencePiece (tokenizer.model); a tokenizer.json-only model is refused.
HfModel read_hf(const std::string& dir);

}  // namespace moe::ckpt
