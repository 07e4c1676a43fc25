#include "tokenizer/tokenizer.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <queue>

#include "errors.h"

namespace babyrt {
namespace {

constexpr int kIncomplete = -1;

// Length of the valid UTF-8 character at s[0..n): 1-4, 0 if invalid, kIncomplete if the
// bytes so far are a valid start that needs more. Rejects overlongs, surrogates and > U+10FFFF.
// *subpart gets the length of the valid prefix (at least 1): the bytes one U+FFFD replaces.
int utf8_char_len(const unsigned char* s, size_t n, int* subpart = nullptr) {
  int scratch;
  if (!subpart) subpart = &scratch;
  *subpart = 1;
  const unsigned char c = s[0];
  if (c < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c == 0xE0) len = 3, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) len = 3;
  else if (c == 0xED) len = 3, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) len = 3;
  else if (c == 0xF0) len = 4, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) len = 4;
  else if (c == 0xF4) len = 4, hi = 0x8F;
  else return 0;
  for (int i = 1; i < len; ++i) {
    *subpart = i;
    if (static_cast<size_t>(i) >= n) return kIncomplete;
    const unsigned char lo_i = i == 1 ? lo : 0x80, hi_i = i == 1 ? hi : 0xBF;
    if (s[i] < lo_i || s[i] > hi_i) return 0;
  }
  return len;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Appends `bytes` to out with each maximal invalid subpart as one U+FFFD (as Python's
// errors="replace" does); returns how many bytes at the end form an incomplete character
// (left for the caller when `hold_tail`).
size_t append_valid(std::string_view bytes, std::string& out, bool hold_tail) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t i = 0, n = bytes.size();
  while (i < n) {
    int subpart;
    int len = utf8_char_len(s + i, n - i, &subpart);
    if (len == kIncomplete) {
      if (hold_tail) return n - i;
      len = 0;
    }
    if (len == 0) {
      out.append(kReplacement);
      i += subpart;
    } else {
      out.append(bytes.substr(i, len));
      i += len;
    }
  }
  return 0;
}

// "<0xHH>" -> HH, else -1.
int parse_byte_piece(std::string_view p) {
  if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
  unsigned v = 0;
  for (char c : p.substr(3, 2)) {
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else return -1;
  }
  return static_cast<int>(v);
}

}  // namespace

std::string sanitize_utf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  append_valid(bytes, out, /*hold_tail=*/false);
  return out;
}

std::string Utf8Stream::push(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  const size_t held = append_valid(pending_, out, /*hold_tail=*/true);
  pending_.erase(0, pending_.size() - held);
  return out;
}

std::string Utf8Stream::finish() {
  std::string out = sanitize_utf8(pending_);
  pending_.clear();
  return out;
}

Tokenizer Tokenizer::from_file(const std::string& path, const TokenizerOptions& options) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw TokenizerError(path + ": cannot open tokenizer file");
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw TokenizerError(path + ": read error");
  return from_bytes(data, options, path);
}

Tokenizer Tokenizer::from_bytes(std::string_view data, const TokenizerOptions& options,
                                const std::string& origin) {
  auto fail = [&](const std::string& what) { throw TokenizerError(origin + ": " + what); };
  if (options.vocab_size < 1) fail("vocab_size must be positive");
  if (data.size() < 4) fail("too short for a tokenizer.bin header (" +
                            std::to_string(data.size()) + " bytes, need at least 4)");
  auto read_u32 = [&](size_t off) {
    uint32_t v;
    std::memcpy(&v, data.data() + off, 4);
    return v;
  };
  const uint32_t max_len = read_u32(0);
  size_t off = 4;
  Tokenizer t;
  t.options_ = options;
  // Each record takes at least 8 bytes: check before reserving, so a bad vocab_size cannot
  // make us allocate.
  if (static_cast<uint64_t>(options.vocab_size) > (data.size() - 4) / 8)
    fail("holds fewer records than the model's vocab_size " + std::to_string(options.vocab_size) +
         " (file is " + std::to_string(data.size()) + " bytes)");
  t.pieces_.reserve(options.vocab_size);
  t.scores_.reserve(options.vocab_size);
  for (int64_t i = 0; i < options.vocab_size; ++i) {
    if (data.size() - off < 8)
      fail("ends after " + std::to_string(i) + " records; the model's vocab_size is " +
           std::to_string(options.vocab_size));
    float score;
    std::memcpy(&score, data.data() + off, 4);
    const uint32_t len = read_u32(off + 4);
    off += 8;
    if (std::isnan(score)) fail("record " + std::to_string(i) + " has a NaN score");
    if (len > max_len)
      fail("record " + std::to_string(i) + " has length " + std::to_string(len) +
           ", above max_token_length " + std::to_string(max_len));
    if (len > data.size() - off)
      fail("record " + std::to_string(i) + " needs " + std::to_string(len) + " bytes, only " +
           std::to_string(data.size() - off) + " remain");
    t.pieces_.emplace_back(data.substr(off, len));
    t.scores_.push_back(score);
    off += len;
  }
  if (off != data.size())
    fail("has " + std::to_string(data.size() - off) + " bytes after the " +
         std::to_string(options.vocab_size) +
         " records the model's vocab_size asks for: the tokenizer does not match the model");

  std::fill(std::begin(t.byte_ids_), std::end(t.byte_ids_), -1);
  t.bytes_.resize(t.pieces_.size());
  int n_bytes = 0;
  for (int32_t id = 0; id < static_cast<int32_t>(t.pieces_.size()); ++id) {
    const std::string& p = t.pieces_[id];
    const bool control = id == options.bos_id || id == options.eos_id;
    const int b = parse_byte_piece(p);
    if (control) continue;  // decodes to nothing, never matched
    if (b >= 0) {
      if (t.byte_ids_[b] < 0) t.byte_ids_[b] = id, ++n_bytes;
      t.bytes_[id] = std::string(1, static_cast<char>(b));
      continue;
    }
    t.bytes_[id] = p;
    if (p == "<unk>") {
      if (t.unk_id_ < 0) t.unk_id_ = id;
      continue;
    }
    if (!p.empty()) t.index_.emplace(p, id);  // the first id of a duplicated piece wins
  }
  t.has_byte_fallback_ = n_bytes == 256;
  return t;
}

int32_t Tokenizer::lookup(std::string_view s) const {
  auto it = index_.find(s);
  return it == index_.end() ? -1 : it->second;
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(pieces_.size()))
    throw TokenizerError("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                         std::to_string(pieces_.size()) + ")");
}

const std::string& Tokenizer::piece(int32_t id) const {
  check_id(id);
  return pieces_[id];
}

float Tokenizer::score(int32_t id) const {
  check_id(id);
  return scores_[id];
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> out;
  if (add_bos) {
    if (options_.bos_id < 0) throw TokenizerError("add_bos asked, but the tokenizer has no BOS");
    out.push_back(static_cast<int32_t>(options_.bos_id));
  }
  if (text.empty()) return out;
  std::string s;
  if (options_.sentencepiece) {
    s.push_back(' ');  // the dummy prefix
    // sentencepiece writes spaces as U+2581, so a literal U+2581 is a space to it.
    for (size_t i = 0; i < text.size(); ++i) {
      if (text.compare(i, 3, "\xE2\x96\x81") == 0) {
        s.push_back(' ');
        i += 2;
      } else {
        s.push_back(text[i]);
      }
    }
  } else {
    s.append(text);
  }

  // Symbols start as single characters (an invalid byte is a symbol of its own).
  struct Symbol {
    uint32_t start, len;
    int32_t prev, next;
  };
  std::vector<Symbol> sym;
  const auto* u = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    int len = utf8_char_len(u + i, s.size() - i);
    if (len <= 0) len = 1;
    const int32_t k = static_cast<int32_t>(sym.size());
    sym.push_back({static_cast<uint32_t>(i), static_cast<uint32_t>(len), k - 1, k + 1});
    i += len;
  }
  sym.back().next = -1;
  auto view = [&](uint32_t start, uint32_t len) { return std::string_view(s).substr(start, len); };

  if (options_.sentencepiece) {
    // Best-scoring pair first, leftmost on ties: sentencepiece's BPE agenda.
    struct Pair {
      float score;
      int32_t left, right;
      uint32_t len;  // merged length when queued: a pair is stale if its symbols changed
    };
    auto worse = [](const Pair& a, const Pair& b) {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
    auto consider = [&](int32_t l, int32_t r) {
      if (l < 0 || r < 0) return;
      const uint32_t len = sym[l].len + sym[r].len;
      const int32_t id = lookup(view(sym[l].start, len));
      if (id >= 0) agenda.push({scores_[id], l, r, len});
    };
    for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) consider(i, i + 1);
    while (!agenda.empty()) {
      const Pair p = agenda.top();
      agenda.pop();
      Symbol &l = sym[p.left], &r = sym[p.right];
      if (l.len == 0 || r.len == 0 || l.next != p.right || l.len + r.len != p.len) continue;
      l.len += r.len;
      l.next = r.next;
      if (r.next >= 0) sym[r.next].prev = p.left;
      r.len = 0;
      consider(l.prev, p.left);
      consider(p.left, l.next);
    }
  }

  for (int32_t i = 0; i >= 0 && i < static_cast<int32_t>(sym.size()); i = sym[i].next) {
    const std::string_view piece = view(sym[i].start, sym[i].len);
    const int32_t id = lookup(piece);
    if (id >= 0) {
      out.push_back(id);
    } else if (!options_.sentencepiece) {
      throw TokenizerError("character '" + sanitize_utf8(piece) + "' at byte " +
                           std::to_string(sym[i].start) + " is not in the char-level vocabulary");
    } else if (has_byte_fallback_) {
      for (unsigned char b : piece) out.push_back(byte_ids_[b]);
    } else if (unk_id_ >= 0) {
      if (out.empty() || out.back() != unk_id_) out.push_back(unk_id_);  // runs of unknowns: one <unk>
    } else {
      throw TokenizerError("text '" + sanitize_utf8(piece) +
                           "' has no piece, no byte fallback and no <unk> in this vocabulary");
    }
  }
  return out;
}

std::string_view Tokenizer::piece_bytes(int32_t prev, int32_t id) const {
  check_id(id);
  std::string_view b = bytes_[id];
  if (prev >= 0 && prev == options_.bos_id && !b.empty() && b[0] == ' ') b.remove_prefix(1);
  return b;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string raw;
  bool first = true;
  for (int32_t id : ids) {
    check_id(id);
    std::string_view b = bytes_[id];
    if (b.empty()) continue;
    if (first && options_.sentencepiece && b[0] == ' ') b.remove_prefix(1);
    first = false;
    raw.append(b);
  }
  return sanitize_utf8(raw);
}

}  // namespace babyrt
