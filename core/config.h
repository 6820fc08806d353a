// Loading, overriding and validating the run configuration (proto/config.proto).
#pragma once
#include <string>
#include <vector>

#include "proto/config.pb.h"

namespace moe {

using Config = proto::Config;

// Parses a protobuf text file. Unknown fields and syntax errors throw moe::Error naming file:line:column.
Config load_config_file(const std::string& path);
Config parse_config_text(const std::string& text, const std::string& source_name);

// Applies one override "path.to.field=value" (e.g. "model.d_model=256", "model.ffn_pattern=FFN_DENSE,FFN_MOE").
// Throws naming the path if the field does not exist or the value does not parse.
void apply_override(Config& cfg, const std::string& assignment);

// Fills defaults for zero-valued optional fields (documented in config.proto).
void fill_defaults(Config& cfg);

// Checks sizes and relations; throws moe::Error naming the offending field and value.
// `needs_data`: the training data file must exist.
void validate_config(const Config& cfg, bool needs_data);

// Text dump of a config (protobuf text format).
std::string config_to_text(const google::protobuf::Message& cfg);

// FFN kind of layer `layer` according to model.ffn_pattern.
proto::FfnKind layer_ffn_kind(const proto::ModelConfig& m, int layer);

}  // namespace moe
