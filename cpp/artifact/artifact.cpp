#include "artifact/artifact.h"

#include <caffe2/serialize/inline_container.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "babyrt_format_json.h"
#include "errors.h"

namespace babyrt {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

const json& format_definition() {
  static const json def = json::parse(generated::kArtifactFormatJson);
  return def;
}

std::string type_name(const json& v) { return v.type_name(); }

// Check one field against its definition ({"type": int|enum|bool|object, ...}).
void check_field(const std::string& origin, const std::string& name, const json& spec,
                 const json& value) {
  const std::string type = spec.at("type");
  auto fail = [&](const std::string& what) {
    throw ArtifactError(origin + ": metadata field '" + name + "' " + what);
  };
  if (type == "int") {
    if (!value.is_number_integer()) fail("must be an integer, got " + type_name(value));
    const int64_t v = value.get<int64_t>();
    const int64_t lo = spec.at("min"), hi = spec.value("max", INT64_MAX);
    if (v < lo || v > hi)
      fail("must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
           std::to_string(v));
  } else if (type == "enum") {
    if (!value.is_string()) fail("must be a string, got " + type_name(value));
    bool ok = false;
    for (const auto& allowed : spec.at("values")) ok = ok || allowed == value;
    if (!ok) fail("must be one of " + spec.at("values").dump() + ", got " + value.dump());
  } else if (type == "bool") {
    if (!value.is_boolean()) fail("must be a boolean, got " + type_name(value));
  } else if (type == "object") {
    if (!value.is_object()) fail("must be an object, got " + type_name(value));
  }
}

}  // namespace

const char* artifact_format_json() { return generated::kArtifactFormatJson; }

Metadata parse_metadata(const std::string& json_text, const std::string& origin) {
  json doc = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) throw ArtifactError(origin + ": metadata is not valid JSON");
  if (!doc.is_object()) throw ArtifactError(origin + ": metadata must be a JSON object");

  const json& def = format_definition();
  // The version comes first, so that a newer artifact gets a clear message.
  if (doc.contains("format_version") && doc["format_version"].is_number_integer() &&
      doc["format_version"] != def.at("format_version"))
    throw ArtifactError(origin + ": artifact format version " +
                        doc["format_version"].dump() + " is not supported (this runtime reads " +
                        def.at("format_version").dump() + ")");
  for (const auto& [name, spec] : def.at("fields").items()) {
    if (!doc.contains(name)) throw ArtifactError(origin + ": metadata lacks field '" + name + "'");
    check_field(origin, name, spec, doc[name]);
  }
  for (const auto& [name, spec] : def.at("optional_fields").items())
    if (doc.contains(name)) check_field(origin, name, spec, doc[name]);

  Metadata m;
  m.format_version = doc["format_version"];
  m.architecture = doc["architecture"];
  m.vocab_size = doc["vocab_size"];
  m.context_length = doc["context_length"];
  m.n_layers = doc["n_layers"];
  m.n_kv_heads = doc["n_kv_heads"];
  m.head_dim = doc["head_dim"];
  m.dtype = doc["dtype"];
  m.quantization = doc["quantization"];
  m.bos_id = doc["bos_id"];
  m.eos_id = doc["eos_id"];
  m.add_bos = doc["add_bos"];
  m.tokenizer_kind = doc["tokenizer_kind"];
  m.cache_kind = doc["cache_kind"];
  m.json = json_text;

  // Rules that tie fields together.
  auto fail = [&](const std::string& what) { throw ArtifactError(origin + ": metadata " + what); };
  if (m.bos_id >= m.vocab_size || m.eos_id >= m.vocab_size)
    fail("bos_id/eos_id must be below vocab_size " + std::to_string(m.vocab_size));
  if (m.add_bos && m.bos_id < 0) fail("sets add_bos but has no bos_id");
  if (m.cache_kind == "kv" && (m.n_layers < 1 || m.n_kv_heads < 1 || m.head_dim < 1))
    fail("cache_kind 'kv' needs n_layers, n_kv_heads and head_dim >= 1");
  return m;
}

ArtifactPaths locate_artifact(const std::string& dir) {
  const json& files = format_definition().at("files");
  ArtifactPaths p;
  p.dir = dir;
  p.model = (fs::path(dir) / files.at("model").get<std::string>()).string();
  p.tokenizer = (fs::path(dir) / files.at("tokenizer").get<std::string>()).string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw ArtifactError(dir + ": not an artifact directory (expected a directory holding " +
                        files.at("model").get<std::string>() + " and " +
                        files.at("tokenizer").get<std::string>() + ")");
  for (const auto& f : {p.model, p.tokenizer})
    if (!fs::is_regular_file(f, ec)) throw ArtifactError(f + ": missing from the artifact");
  return p;
}

Metadata read_metadata(const std::string& model_path) {
  const std::string record =
      "extra/" + format_definition().at("metadata_record").get<std::string>();
  std::string text;
  try {
    caffe2::serialize::PyTorchStreamReader reader(model_path);
    if (!reader.hasRecord(record))
      throw ArtifactError(model_path + ": not a babyrt model (no " + record + " record)");
    auto [data, size] = reader.getRecord(record);
    text.assign(static_cast<const char*>(data.get()), size);
  } catch (const ArtifactError&) {
    throw;
  } catch (const std::exception& e) {
    // c10::Error messages carry a C++ backtrace; keep the first line.
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    throw ArtifactError(model_path + ": not a readable TorchScript archive (" + what + ")");
  }
  return parse_metadata(text, model_path);
}

}  // namespace babyrt
