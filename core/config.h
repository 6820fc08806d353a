// Loading, overriding, defaulting and validating the run configuration (proto/config.proto).
#pragma once
#include <string>
#include <vector>

#include "proto/config.pb.h"

namespace moe {

using Config = proto::Config;

// Parses a protobuf text file. Unknown fields and syntax errors throw moe::Error naming file:line:column.
// Relative data paths in the file (data.train_file, data.tokenizer_model) are resolved (resolve_data_paths)
// against `data_dir` when it is given, else against the directory of the file, so a config works from any working
// directory. Overrides applied afterwards (apply_override) are not resolved: they stay relative to the working
// directory.
Config load_config_file(const std::string& path, const std::string& data_dir = "");
Config parse_config_text(const std::string& text, const std::string& source_name);

// Makes a relative data.train_file / data.tokenizer_model absolute against `base_dir` (itself relative to the
// working directory, or absolute). Absolute and empty paths are kept.
void resolve_data_paths(proto::DataConfig* d, const std::string& base_dir);

// Applies one override "path.to.field=value" (e.g. "model.d_model=256", "model.ffn_pattern=FFN_DENSE,FFN_MOE").
// Throws naming the path if the field does not exist or the value does not parse.
void apply_override(Config& cfg, const std::string& assignment);

// Defaults (stated in config.proto), one function per message, each default written once: a field declared
// `optional` that is absent gets its default; a present one, 0 included, is kept (and validated later).
// Defaults that depend on another message take its value as a parameter.
void fill_defaults(proto::ModelConfig* m, int data_seq_len);  // max_seq_len: data.seq_len; moe, word_experts
void fill_defaults(proto::MoeConfig* e, int d_ff);            // d_expert: model.d_ff
void fill_defaults(proto::WordExpertConfig* w);
void fill_defaults(proto::DataConfig* d);
void fill_defaults(proto::OptimizerConfig* o);
void fill_defaults(proto::TrainConfig* t);
void fill_defaults(proto::ParallelConfig* p);
void fill_defaults(proto::GenerateConfig* g);
void fill_defaults(proto::ServingConfig* s);
// All of the above (CheckpointConfig has no defaulted fields).
void fill_defaults(Config& cfg);

// Validators per subsystem: check sizes and relations of filled configs; throw moe::Error naming the offending
// field and value ("config field model.d_model = -64: must be > 0").
void validate(const proto::ModelConfig& m);  // with model.moe / model.word_experts where ffn_pattern uses them
// `max_seq_len`: model.max_seq_len; `needs_data`: data.train_file (and data.tokenizer_model if set) must exist.
void validate(const proto::DataConfig& d, int max_seq_len, bool needs_data);
void validate(const proto::OptimizerConfig& o);
void validate(const proto::TrainConfig& t);
// The expert-parallel size against the model's experts, and the communicator against model.device.
void validate(const proto::ParallelConfig& p, const proto::ModelConfig& m);
void validate(const proto::CheckpointConfig& c);
void validate(const proto::GenerateConfig& g);
void validate(const proto::ServingConfig& s);
// All of the above.
void validate_config(const Config& cfg, bool needs_data);

// Text dump of a config (protobuf text format).
std::string config_to_text(const google::protobuf::Message& cfg);

// FFN kind of layer `layer` according to model.ffn_pattern.
proto::FfnKind layer_ffn_kind(const proto::ModelConfig& m, int layer);

}  // namespace moe
