// Artifact format v1: a directory holding a TorchScript module (with the metadata JSON as an
// extra record) and a llama2.c-layout tokenizer.bin. The field list lives in
// python/babyrt/artifact_format.json, embedded here at build time; this file validates against it.
#pragma once
#include <cstdint>
#include <string>

namespace babyrt {

struct Metadata {
  int64_t format_version = 0;
  std::string architecture;    // llama | gpt | bigram | ngram
  int64_t vocab_size = 0;
  int64_t context_length = 0;
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  std::string dtype;           // fp32 | bf16 | fp16
  std::string quantization;    // none | int8
  int64_t bos_id = -1;
  int64_t eos_id = -1;
  bool add_bos = false;
  std::string tokenizer_kind;  // char | sentencepiece
  std::string cache_kind;      // kv | window
  std::string json;            // the record as stored
};

struct ArtifactPaths {
  std::string dir;
  std::string model;      // <dir>/model.pt
  std::string tokenizer;  // <dir>/tokenizer.bin
};

// The format definition (the embedded artifact_format.json text).
const char* artifact_format_json();

// Parse and validate a metadata record. `origin` names the file in error messages.
// Throws ArtifactError on malformed JSON, missing fields, wrong types, bad values.
Metadata parse_metadata(const std::string& json_text, const std::string& origin);

// Check that `dir` is an artifact directory and name its files. Throws ArtifactError.
ArtifactPaths locate_artifact(const std::string& dir);

// Read the metadata record out of a TorchScript file without loading the module.
Metadata read_metadata(const std::string& model_path);

}  // namespace babyrt
