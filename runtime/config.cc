#include "runtime/config.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <toml++/toml.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "common/file_util.h"
#include "common/status.h"
#include "runtime/piece_ops.h"

namespace shoal::runtime {
namespace {

// The schema: one row per key, in struct order. ParseConfig, the override path and ToToml all
// walk this table, so adding a field to config.h means adding exactly one row here.
enum class Kind { kInt, kInt64, kUint64, kDouble, kBool, kString, kIntList, kByteSize };

struct Field {
  const char* section;
  const char* key;
  Kind kind;
  void* (*get)(Config&);  // address of the member inside a Config
};

#define SHOAL_FIELD(sec, name, kind) \
  Field{#sec, #name, kind, [](Config& c) -> void* { return &c.sec.name; }}

const std::vector<Field>& Schema() {
  static const std::vector<Field>* const kSchema = new std::vector<Field>{
      SHOAL_FIELD(model, n_layer, Kind::kInt),
      SHOAL_FIELD(model, n_head, Kind::kInt),
      SHOAL_FIELD(model, n_embd, Kind::kInt),
      SHOAL_FIELD(model, block_size, Kind::kInt),
      SHOAL_FIELD(model, vocab_size, Kind::kInt),
      SHOAL_FIELD(data, dir, Kind::kString),
      SHOAL_FIELD(data, verify_checksums, Kind::kBool),
      SHOAL_FIELD(train, steps, Kind::kInt64),
      SHOAL_FIELD(train, batch_size, Kind::kInt),
      SHOAL_FIELD(train, grad_accum, Kind::kInt),
      SHOAL_FIELD(train, seed, Kind::kUint64),
      SHOAL_FIELD(train, log_every, Kind::kInt),
      SHOAL_FIELD(train, eval_every, Kind::kInt),
      SHOAL_FIELD(train, eval_batches, Kind::kInt),
      SHOAL_FIELD(train, out_dir, Kind::kString),
      SHOAL_FIELD(train, omp_threads, Kind::kInt),
      SHOAL_FIELD(train, blas_threads, Kind::kInt),
      SHOAL_FIELD(train, kernels, Kind::kString),
      SHOAL_FIELD(train, dtype, Kind::kString),
      SHOAL_FIELD(optim, lr, Kind::kDouble),
      SHOAL_FIELD(optim, min_lr_ratio, Kind::kDouble),
      SHOAL_FIELD(optim, warmup_steps, Kind::kInt64),
      SHOAL_FIELD(optim, beta1, Kind::kDouble),
      SHOAL_FIELD(optim, beta2, Kind::kDouble),
      SHOAL_FIELD(optim, eps, Kind::kDouble),
      SHOAL_FIELD(optim, weight_decay, Kind::kDouble),
      SHOAL_FIELD(optim, grad_clip, Kind::kDouble),
      SHOAL_FIELD(optim, name, Kind::kString),
      SHOAL_FIELD(optim, demo_chunk, Kind::kInt),
      SHOAL_FIELD(optim, demo_topk, Kind::kInt),
      SHOAL_FIELD(optim, demo_decay, Kind::kDouble),
      SHOAL_FIELD(optim, demo_wire, Kind::kString),
      SHOAL_FIELD(optim, demo_weight_decay, Kind::kDouble),
      SHOAL_FIELD(optim, demo_drift_check, Kind::kInt),
      SHOAL_FIELD(checkpoint, dir, Kind::kString),
      SHOAL_FIELD(checkpoint, every, Kind::kInt),
      SHOAL_FIELD(checkpoint, keep, Kind::kInt),
      SHOAL_FIELD(parallel, backend, Kind::kString),
      SHOAL_FIELD(parallel, zero, Kind::kInt),
      SHOAL_FIELD(parallel, bucket_mb, Kind::kDouble),
      SHOAL_FIELD(parallel, timeout_s, Kind::kDouble),
      SHOAL_FIELD(parallel, tp, Kind::kInt),
      SHOAL_FIELD(parallel, pp, Kind::kInt),
      SHOAL_FIELD(parallel, stages, Kind::kIntList),
      SHOAL_FIELD(parallel, schedule, Kind::kString),
      SHOAL_FIELD(parallel, virtual_stages, Kind::kInt),
      SHOAL_FIELD(memory, device_budget, Kind::kByteSize),
      SHOAL_FIELD(memory, host_budget, Kind::kByteSize),
      SHOAL_FIELD(memory, disk_budget, Kind::kByteSize),
      SHOAL_FIELD(memory, disk_path, Kind::kString),
      SHOAL_FIELD(memory, activation_budget, Kind::kByteSize),
      SHOAL_FIELD(memory, activation_offload, Kind::kString),
      SHOAL_FIELD(swarm, sync, Kind::kString),
      SHOAL_FIELD(swarm, slow_link_mbit, Kind::kDouble),
  };
  return *kSchema;
}

#undef SHOAL_FIELD

constexpr const char* kSections[] = {"model",      "data",     "train", "optim",
                                     "checkpoint", "parallel", "memory", "swarm"};

// Other names a section answers to in files and overrides, as {alias, canonical}. The issue
// tracker and other trainers call the optimizer section "optimizer"; ToToml writes only the
// canonical name, so a manifest reads the same whichever spelling the run was started with.
constexpr std::pair<const char*, const char*> kSectionAliases[] = {{"optimizer", "optim"}};

// "optim" for "optimizer"; any other name unchanged (it may not be a section at all).
absl::string_view CanonicalSection(absl::string_view section) {
  for (const auto& [alias, canonical] : kSectionAliases) {
    if (section == alias) return canonical;
  }
  return section;
}

// `section` may be an alias.
const Field* FindField(absl::string_view section, absl::string_view key) {
  const absl::string_view canonical = CanonicalSection(section);
  for (const Field& f : Schema()) {
    if (canonical == f.section && key == f.key) return &f;
  }
  return nullptr;
}

bool IsSection(absl::string_view name) {
  const absl::string_view canonical = CanonicalSection(name);
  for (const char* s : kSections) {
    if (canonical == s) return true;
  }
  return false;
}

// Section names a misspelled one is compared with: the canonical names and the aliases.
std::vector<std::string> SectionNames() {
  std::vector<std::string> names(std::begin(kSections), std::end(kSections));
  for (const auto& [alias, canonical] : kSectionAliases) names.push_back(alias);
  return names;
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean 'model.n_layer'?)" when a known name is within a couple of edits of `name`
// (or `name` is a known key in the wrong place), else "".
std::string Suggestion(absl::string_view name, const std::vector<std::string>& known) {
  const std::string* best = nullptr;
  size_t best_distance = 3;  // suggest only close misspellings
  for (const std::string& candidate : known) {
    size_t d = EditDistance(name, candidate);
    // A bare key that exists in some section ("lr" for "optim.lr") counts as close.
    const size_t dot = candidate.find('.');
    if (dot != std::string::npos && absl::string_view(candidate).substr(dot + 1) == name) d = 0;
    if (d < best_distance) {
      best_distance = d;
      best = &candidate;
    }
  }
  return best == nullptr ? "" : absl::StrCat(" (did you mean '", *best, "'?)");
}

std::vector<std::string> AllKeys() {
  std::vector<std::string> keys;
  for (const Field& f : Schema()) keys.push_back(absl::StrCat(f.section, ".", f.key));
  return keys;
}

// Suggestion() for an unknown "section.key" whose section may be an alias: compared under the
// canonical section (so "optimizer.demo_topK" is one edit from "optim.demo_topk", not six),
// and shown in the spelling the user wrote when the match is in that same section.
std::string KeySuggestion(absl::string_view section, absl::string_view key) {
  const absl::string_view canonical = CanonicalSection(section);
  std::string suggestion = Suggestion(absl::StrCat(canonical, ".", key), AllKeys());
  const std::string canonical_prefix = absl::StrCat("'", canonical, ".");
  const size_t at = suggestion.find(canonical_prefix);
  if (canonical != section && at != std::string::npos) {
    suggestion.replace(at, canonical_prefix.size(), absl::StrCat("'", section, "."));
  }
  return suggestion;
}

const char* TypeName(toml::node_type type) {
  switch (type) {
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    case toml::node_type::array: return "array";
    case toml::node_type::table: return "table";
    case toml::node_type::date: return "date";
    case toml::node_type::time: return "time";
    case toml::node_type::date_time: return "date-time";
    default: return "nothing";
  }
}

const char* KindName(Kind kind) {
  switch (kind) {
    case Kind::kInt:
    case Kind::kInt64: return "an integer";
    case Kind::kUint64: return "a non-negative integer";
    case Kind::kDouble: return "a number";
    case Kind::kBool: return "a boolean";
    case Kind::kString: return "a string";
    case Kind::kIntList: return "an array of integers";
    case Kind::kByteSize: return "a size (a string such as \"512MiB\", or bytes)";
  }
  return "?";
}

// " in cfg.toml (line 3)" for a node from the file, " in override 'a.b=c'" for an override.
std::string Where(absl::string_view where, const toml::node& node) {
  if (node.source().begin.line == 0) return absl::StrCat(" in ", where);
  return absl::StrCat(" in ", where, " (line ", node.source().begin.line, ")");
}

// Stores `node` into the member `field` of `config`, checking its type and range.
// `location` ends messages: " in cfg.toml (line 3)" or " in override 'a.b=c'".
absl::Status SetField(const Field& field, const toml::node& node, absl::string_view location,
                      Config& config) {
  const std::string name = absl::StrCat(field.section, ".", field.key);
  void* member = field.get(config);
  auto wrong_type = [&]() {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be ", KindName(field.kind),
                                                   " (got ", TypeName(node.type()), ")",
                                                   location));
  };
  switch (field.kind) {
    case Kind::kInt: {
      if (!node.is_integer()) return wrong_type();
      const int64_t v = node.as_integer()->get();
      if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " = ", v, " is out of range for a 32-bit integer", location));
      }
      *static_cast<int*>(member) = static_cast<int>(v);
      return absl::OkStatus();
    }
    case Kind::kInt64:
      if (!node.is_integer()) return wrong_type();
      *static_cast<int64_t*>(member) = node.as_integer()->get();
      return absl::OkStatus();
    case Kind::kUint64: {
      if (!node.is_integer()) return wrong_type();
      const int64_t v = node.as_integer()->get();
      if (v < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " = ", v, " must be a non-negative integer", location));
      }
      *static_cast<uint64_t*>(member) = static_cast<uint64_t>(v);
      return absl::OkStatus();
    }
    case Kind::kDouble:
      // An integer is accepted where a float is expected: `lr = 1` means 1.0.
      if (node.is_integer()) {
        *static_cast<double*>(member) = static_cast<double>(node.as_integer()->get());
      } else if (node.is_floating_point()) {
        *static_cast<double*>(member) = node.as_floating_point()->get();
      } else {
        return wrong_type();
      }
      return absl::OkStatus();
    case Kind::kBool:
      if (!node.is_boolean()) return wrong_type();
      *static_cast<bool*>(member) = node.as_boolean()->get();
      return absl::OkStatus();
    case Kind::kString:
      if (!node.is_string()) return wrong_type();
      *static_cast<std::string*>(member) = node.as_string()->get();
      return absl::OkStatus();
    case Kind::kByteSize: {
      std::string text;
      if (node.is_string()) {
        text = node.as_string()->get();
      } else if (node.is_integer()) {
        text = absl::StrCat(node.as_integer()->get());
      } else {
        return wrong_type();
      }
      absl::StatusOr<ByteSize> size = ByteSize::Parse(text, name);
      if (!size.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(size.status().message(), location));
      }
      *static_cast<ByteSize*>(member) = *std::move(size);
      return absl::OkStatus();
    }
    case Kind::kIntList: {
      if (!node.is_array()) return wrong_type();
      std::vector<int> values;
      for (const toml::node& item : *node.as_array()) {
        if (!item.is_integer()) {
          return absl::InvalidArgumentError(absl::StrCat(name, " must be ", KindName(field.kind),
                                                         " (got an element of type ",
                                                         TypeName(item.type()), ")", location));
        }
        const int64_t v = item.as_integer()->get();
        if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) {
          return absl::InvalidArgumentError(absl::StrCat(
              name, " element ", v, " is out of range for a 32-bit integer", location));
        }
        values.push_back(static_cast<int>(v));
      }
      *static_cast<std::vector<int>*>(member) = std::move(values);
      return absl::OkStatus();
    }
  }
  return absl::InternalError("unreachable");
}

std::string FormatParseError(const toml::parse_error& e, absl::string_view source) {
  const toml::source_position& pos = e.source().begin;
  return absl::StrCat(source, ":", pos.line, ":", pos.column, ": TOML syntax error: ",
                      std::string(e.description()));
}

absl::Status ApplyTable(const toml::table& root, const std::string& source, Config& config) {
  // Canonical "section.key" -> the section it was written under, so that a key given under
  // both a section and its alias ([optim] lr and [optimizer] lr) is an error, not a silent
  // choice between the two.
  std::map<std::string, std::string> written_under;
  for (auto&& [section_key, section_node] : root) {
    const std::string section(section_key.str());
    if (!IsSection(section)) {
      if (!section_node.is_table()) {
        return absl::InvalidArgumentError(absl::StrCat("unknown key '", section, "'",
                                                       Where(source, section_node),
                                                       Suggestion(section, AllKeys())));
      }
      return absl::InvalidArgumentError(
          absl::StrCat("unknown section '", section, "'", Where(source, section_node),
                       Suggestion(section, SectionNames())));
    }
    if (!section_node.is_table()) {
      return absl::InvalidArgumentError(absl::StrCat(section, " must be a table (got ",
                                                     TypeName(section_node.type()), ")",
                                                     Where(source, section_node)));
    }
    for (auto&& [toml_key, node] : *section_node.as_table()) {
      const std::string key(toml_key.str());
      const Field* field = FindField(section, key);
      if (field == nullptr) {
        const std::string name = absl::StrCat(section, ".", key);
        return absl::InvalidArgumentError(absl::StrCat("unknown key '", name, "'",
                                                       Where(source, node),
                                                       KeySuggestion(section, key)));
      }
      const auto [it, first] =
          written_under.emplace(absl::StrCat(field->section, ".", field->key), section);
      if (!first) {
        return absl::InvalidArgumentError(absl::StrCat(
            it->first, " is set under both [", it->second, "] and [", section, "]",
            Where(source, node), "; keep one"));
      }
      SHOAL_RETURN_IF_ERROR(SetField(*field, node, Where(source, node), config));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplyOverride(const std::string& override_text, Config& config) {
  const std::string where = absl::StrCat("override '", override_text, "'");
  const size_t eq = override_text.find('=');
  if (eq == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", where, ": expected section.key=value"));
  }
  const absl::string_view name = absl::StripAsciiWhitespace(
      absl::string_view(override_text).substr(0, eq));
  const absl::string_view raw_value = absl::StripAsciiWhitespace(
      absl::string_view(override_text).substr(eq + 1));
  const size_t dot = name.find('.');
  if (dot == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", where, ": expected section.key=value (no section in '", name,
                     "')", Suggestion(name, AllKeys())));
  }
  const Field* field = FindField(name.substr(0, dot), name.substr(dot + 1));
  if (field == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown key '", name, "' in ", where,
                     KeySuggestion(name.substr(0, dot), name.substr(dot + 1))));
  }
  // Read the value as TOML ("3", "1e-4", "true", "\"a b\""); text that is not a TOML value is
  // taken as a string, so `data.dir=/tmp/x` needs no quotes.
  toml::table parsed;
  bool is_toml_value = false;
  try {
    parsed = toml::parse(absl::StrCat("v = ", raw_value, "\n"));
    is_toml_value = parsed.size() == 1 && parsed.contains("v");
  } catch (const toml::parse_error&) {
    is_toml_value = false;
  }
  if (field->kind == Kind::kByteSize && !(is_toml_value && parsed["v"].is_string())) {
    // A size reads its raw text: `memory.host_budget=64MiB`, `=4000000`, or `=` (unset).
    absl::StatusOr<ByteSize> size = ByteSize::Parse(std::string(raw_value), std::string(name));
    if (!size.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(size.status().message(), " in ", where));
    }
    *static_cast<ByteSize*>(field->get(config)) = *std::move(size);
    return absl::OkStatus();
  }
  if (!is_toml_value || (field->kind == Kind::kString && !parsed["v"].is_string())) {
    // A string key takes the raw text even when it happens to parse as a number or a boolean
    // (`data.dir=2024`): for a string there is no other reading of it.
    if (field->kind != Kind::kString) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be ", KindName(field->kind),
                                                     " (got string) in ", where));
    }
    *static_cast<std::string*>(field->get(config)) = std::string(raw_value);
    return absl::OkStatus();
  }
  return SetField(*field, *parsed.get("v"), absl::StrCat(" in ", where), config);
}

// TOML basic string with the escapes TOML requires (quote, backslash, control characters).
std::string TomlQuote(absl::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\f': out += "\\f"; break;
      case '\r': out += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          absl::StrAppendFormat(&out, "\\u%04X", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

// Shortest-safe TOML float: %.17g round-trips every double; TOML needs a '.' or an exponent.
std::string TomlDouble(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::string s = absl::StrFormat("%.17g", v);
  // Prefer the shortest representation that still reads back exactly.
  for (int precision = 1; precision < 17; ++precision) {
    std::string shorter = absl::StrFormat("%.*g", precision, v);
    if (std::strtod(shorter.c_str(), nullptr) == v) {
      s = shorter;
      break;
    }
  }
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// Collects "name ... " problems for ValidateConfig.
class Problems {
 public:
  void Check(bool ok, std::string message) {
    if (!ok) messages_.push_back(std::move(message));
  }
  bool empty() const { return messages_.empty(); }
  std::string Join() const { return absl::StrJoin(messages_, "; "); }

 private:
  std::vector<std::string> messages_;
};

}  // namespace

std::string Config::ToToml() const {
  Config copy = *this;  // Schema() hands out mutable member addresses
  std::string origin = source;
  for (char& ch : origin) {
    if (static_cast<unsigned char>(ch) < 0x20) ch = ' ';  // keep the comment on one line
  }
  std::string out = absl::StrCat("# shoal config (from ", origin, ")\n");
  absl::string_view current_section;
  for (const Field& f : Schema()) {
    if (current_section != f.section) {
      current_section = f.section;
      absl::StrAppend(&out, "\n[", f.section, "]\n");
    }
    const void* member = f.get(copy);
    std::string value;
    switch (f.kind) {
      case Kind::kInt: value = absl::StrCat(*static_cast<const int*>(member)); break;
      case Kind::kInt64: value = absl::StrCat(*static_cast<const int64_t*>(member)); break;
      case Kind::kUint64: value = absl::StrCat(*static_cast<const uint64_t*>(member)); break;
      case Kind::kDouble: value = TomlDouble(*static_cast<const double*>(member)); break;
      case Kind::kBool: value = *static_cast<const bool*>(member) ? "true" : "false"; break;
      case Kind::kString: value = TomlQuote(*static_cast<const std::string*>(member)); break;
      case Kind::kByteSize: value = TomlQuote(static_cast<const ByteSize*>(member)->text); break;
      case Kind::kIntList:
        value = absl::StrCat("[", absl::StrJoin(*static_cast<const std::vector<int>*>(member), ", "),
                             "]");
        break;
    }
    absl::StrAppend(&out, f.key, " = ", value, "\n");
  }
  return out;
}

absl::StatusOr<Config> ParseConfig(const std::string& toml_text, const std::string& source,
                                   const std::vector<std::string>& overrides) {
  Config config;
  config.source = source;
  toml::table root;
  try {
    root = toml::parse(toml_text, source);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(FormatParseError(e, source));
  }
  SHOAL_RETURN_IF_ERROR(ApplyTable(root, source, config));
  for (const std::string& o : overrides) SHOAL_RETURN_IF_ERROR(ApplyOverride(o, config));
  SHOAL_RETURN_IF_ERROR(ValidateConfig(config));
  return config;
}

absl::StatusOr<Config> LoadConfig(const std::string& path,
                                  const std::vector<std::string>& overrides) {
  if (!PathExists(path)) return absl::NotFoundError(absl::StrCat("config file not found: ", path));
  if (IsDirectory(path)) {
    return absl::InvalidArgumentError(absl::StrCat("config path is a directory: ", path));
  }
  SHOAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseConfig(text, path, overrides);
}

absl::Status ValidateConfig(const Config& c) {
  Problems p;
  auto positive = [&](absl::string_view name, int64_t v) {
    p.Check(v >= 1, absl::StrCat(name, " must be >= 1 (got ", v, ")"));
  };
  auto non_negative = [&](absl::string_view name, int64_t v) {
    p.Check(v >= 0, absl::StrCat(name, " must be >= 0 (got ", v, ")"));
  };
  auto finite_non_negative = [&](absl::string_view name, double v) {
    p.Check(std::isfinite(v) && v >= 0, absl::StrCat(name, " must be finite and >= 0 (got ", v, ")"));
  };

  positive("model.n_layer", c.model.n_layer);
  positive("model.n_head", c.model.n_head);
  positive("model.n_embd", c.model.n_embd);
  positive("model.block_size", c.model.block_size);
  p.Check(c.model.vocab_size >= 2 && c.model.vocab_size <= 65536,
          absl::StrCat("model.vocab_size must be in [2, 65536] (token files are uint16; got ",
                       c.model.vocab_size, ")"));
  if (c.model.n_head >= 1 && c.model.n_embd >= 1) {
    p.Check(c.model.n_embd % c.model.n_head == 0,
            absl::StrCat("model.n_embd (", c.model.n_embd, ") must be divisible by model.n_head (",
                         c.model.n_head, ")"));
  }

  p.Check(!c.data.dir.empty(), "data.dir must be set (the folder with train.bin and val.bin)");

  positive("train.steps", c.train.steps);
  positive("train.batch_size", c.train.batch_size);
  positive("train.grad_accum", c.train.grad_accum);
  positive("train.log_every", c.train.log_every);
  non_negative("train.eval_every", c.train.eval_every);
  positive("train.eval_batches", c.train.eval_batches);
  p.Check(!c.train.out_dir.empty(), "train.out_dir must not be empty");
  non_negative("train.omp_threads", c.train.omp_threads);
  non_negative("train.blas_threads", c.train.blas_threads);
  const absl::StatusOr<Compute> compute = ParseCompute(c.train.kernels, c.train.dtype);
  p.Check(compute.ok(), std::string(compute.status().message()));
  if (compute.ok()) {
    if (compute->precision != Precision::kFp32) {
      // Not yet: the pipeline's and tensor parallelism's exchanges carry float32 activations,
      // and the activation offloader packs float32.
      p.Check(c.parallel.tp == 1 && c.parallel.pp == 1,
              absl::StrCat("train.dtype = '", c.train.dtype, "' is not implemented with model "
                           "parallelism yet (parallel.tp = ", c.parallel.tp, ", parallel.pp = ",
                           c.parallel.pp, "); use fp32 there"));
      p.Check(!c.memory.activation_budget.set(),
              absl::StrCat("train.dtype = '", c.train.dtype, "' is not implemented with "
                           "memory.activation_budget yet (", c.memory.activation_budget.text,
                           "); use fp32 or leave it unset"));
    }
  }

  p.Check(std::isfinite(c.optim.lr) && c.optim.lr > 0,
          absl::StrCat("optim.lr must be finite and > 0 (got ", c.optim.lr, ")"));
  p.Check(c.optim.min_lr_ratio >= 0 && c.optim.min_lr_ratio <= 1,
          absl::StrCat("optim.min_lr_ratio must be in [0, 1] (got ", c.optim.min_lr_ratio, ")"));
  non_negative("optim.warmup_steps", c.optim.warmup_steps);
  p.Check(c.optim.beta1 >= 0 && c.optim.beta1 < 1,
          absl::StrCat("optim.beta1 must be in [0, 1) (got ", c.optim.beta1, ")"));
  p.Check(c.optim.beta2 >= 0 && c.optim.beta2 < 1,
          absl::StrCat("optim.beta2 must be in [0, 1) (got ", c.optim.beta2, ")"));
  p.Check(std::isfinite(c.optim.eps) && c.optim.eps > 0,
          absl::StrCat("optim.eps must be finite and > 0 (got ", c.optim.eps, ")"));
  finite_non_negative("optim.weight_decay", c.optim.weight_decay);
  finite_non_negative("optim.grad_clip", c.optim.grad_clip);
  const bool demo = c.optim.name == "demo";
  p.Check(c.optim.name == "adamw" || demo,
          absl::StrCat("optim.name must be \"adamw\" or \"demo\" (got \"", c.optim.name, "\")"));
  // The DeMo keys are checked whichever optimizer is chosen: a typo should not wait until
  // someone switches optim.name.
  positive("optim.demo_chunk", c.optim.demo_chunk);
  // A tile holds up to chunk² coefficients, addressed by int16 indices on the wire.
  p.Check(c.optim.demo_chunk <= 181,
          absl::StrCat("optim.demo_chunk must be <= 181 so a chunk x chunk tile fits the int16 "
                       "indices of the wire format (got ", c.optim.demo_chunk, ")"));
  // demo_topk may exceed demo_chunk^2: DeMo keeps min(topk, tile size) per tile.
  positive("optim.demo_topk", c.optim.demo_topk);
  p.Check(c.optim.demo_decay >= 0 && c.optim.demo_decay < 1,
          absl::StrCat("optim.demo_decay must be in [0, 1) (got ", c.optim.demo_decay, ")"));
  p.Check(c.optim.demo_wire == "fp32" || c.optim.demo_wire == "bf16" ||
              c.optim.demo_wire == "fp16",
          absl::StrCat("optim.demo_wire must be \"fp32\", \"bf16\" or \"fp16\" (got \"",
                       c.optim.demo_wire, "\")"));
  finite_non_negative("optim.demo_weight_decay", c.optim.demo_weight_decay);
  non_negative("optim.demo_drift_check", c.optim.demo_drift_check);

  non_negative("checkpoint.every", c.checkpoint.every);
  non_negative("checkpoint.keep", c.checkpoint.keep);

  p.Check(c.parallel.backend == "gloo" || c.parallel.backend == "mpi" ||
              c.parallel.backend == "nccl",
          absl::StrCat("parallel.backend must be \"gloo\", \"mpi\" or \"nccl\" (got \"",
                       c.parallel.backend, "\")"));
  p.Check(c.parallel.zero == 0 || c.parallel.zero == 1,
          absl::StrCat("parallel.zero must be 0 (off) or 1 (shard optimizer state; got ",
                       c.parallel.zero, ")"));
  p.Check(std::isfinite(c.parallel.bucket_mb) && c.parallel.bucket_mb > 0,
          absl::StrCat("parallel.bucket_mb must be finite and > 0 (got ", c.parallel.bucket_mb, ")"));
  p.Check(std::isfinite(c.parallel.timeout_s) && c.parallel.timeout_s > 0,
          absl::StrCat("parallel.timeout_s must be finite and > 0 (got ", c.parallel.timeout_s, ")"));
  p.Check(c.parallel.tp >= 1, absl::StrCat("parallel.tp must be >= 1 (got ", c.parallel.tp, ")"));
  p.Check(c.parallel.tp < 1 || c.model.n_head % c.parallel.tp == 0,
          absl::StrCat("parallel.tp = ", c.parallel.tp, " must divide model.n_head = ",
                       c.model.n_head, " (tensor parallelism splits the heads)"));
  const int v = c.parallel.virtual_stages;
  p.Check(v >= 1, absl::StrCat("parallel.virtual_stages must be >= 1 (got ", v, ")"));
  const int model_stages = c.parallel.pp * std::max(1, v);
  p.Check(c.parallel.pp >= 1 && model_stages <= std::max(1, c.model.n_layer),
          absl::StrCat("parallel.pp must be in [1, model.n_layer = ", c.model.n_layer,
                       "] (got ", c.parallel.pp,
                       v > 1 ? absl::StrCat(" with ", v, " virtual stages each") : "",
                       "; every stage holds at least one block)"));
  if (!c.parallel.stages.empty()) {
    int64_t sum = 0;
    bool positive = true;
    for (int b : c.parallel.stages) {
      sum += b;
      positive = positive && b >= 1;
    }
    p.Check(static_cast<int>(c.parallel.stages.size()) == model_stages,
            absl::StrCat("parallel.stages has ", c.parallel.stages.size(),
                         " entries but parallel.pp = ", c.parallel.pp,
                         v > 1 ? absl::StrCat(" x parallel.virtual_stages = ", v) : "",
                         " (one block count per ", v > 1 ? "model stage" : "pipeline stage",
                         ")"));
    p.Check(positive && sum == c.model.n_layer,
            absl::StrCat("parallel.stages = [", absl::StrJoin(c.parallel.stages, ", "),
                         "] must be block counts >= 1 summing to model.n_layer = ",
                         c.model.n_layer));
  }
  p.Check(c.parallel.schedule == "1f1b" || c.parallel.schedule == "gpipe" ||
              c.parallel.schedule == "interleaved",
          absl::StrCat("parallel.schedule must be \"1f1b\", \"gpipe\" or \"interleaved\" "
                       "(got \"", c.parallel.schedule, "\")"));
  if (c.parallel.schedule == "interleaved") {
    p.Check(v >= 2 && c.parallel.pp >= 2,
            absl::StrCat("parallel.schedule = \"interleaved\" needs parallel.pp >= 2 and "
                         "parallel.virtual_stages >= 2 (got ", c.parallel.pp, " and ", v, ")"));
    p.Check(c.parallel.pp < 1 || c.train.grad_accum % c.parallel.pp == 0,
            absl::StrCat("parallel.schedule = \"interleaved\" runs micro-batches in groups of "
                         "parallel.pp = ", c.parallel.pp, ": train.grad_accum = ",
                         c.train.grad_accum, " must be a multiple of it"));
  } else {
    p.Check(v == 1, absl::StrCat("parallel.virtual_stages = ", v,
                                 " needs parallel.schedule = \"interleaved\""));
  }
  const bool model_parallel = c.parallel.tp > 1 || c.parallel.pp > 1;
  p.Check(!model_parallel || c.parallel.backend == "gloo",
          absl::StrCat("parallel.backend = \"", c.parallel.backend,
                       "\" runs data parallelism only; tensor and pipeline parallelism "
                       "(parallel.tp/pp > 1) need \"gloo\""));
  p.Check(!model_parallel || c.parallel.zero == 0,
          "parallel.zero = 1 (ZeRO-1) is for data parallelism only; set it to 0 with "
          "parallel.tp or parallel.pp > 1");
  // NCCL moves device memory only, and the trainer's gradients live on the CPU (there is no
  // train.device yet); DeMo stages its small payloads through the GPU, so it may use NCCL.
  // Model parallelism is refused any backend but gloo just above.
  p.Check(c.parallel.backend != "nccl" || demo || model_parallel,
          "parallel.backend = \"nccl\" moves CUDA tensors only, and this trainer's gradients "
          "are CPU tensors (training on a GPU is not built yet): use \"gloo\" or \"mpi\" (DeMo, "
          "optim.name = \"demo\", stages its payloads through the GPU and may use \"nccl\")");
  // DeMo replaces the gradient all-reduce with its own exchange between data-parallel
  // replicas, each holding a whole model and its own momentum; it has no sharded or
  // model-parallel form yet. Any backend can carry the exchange.
  if (demo) {
    p.Check(c.parallel.zero != 1,
            "optim.name = \"demo\" keeps a local optimizer state per replica; parallel.zero = 1 "
            "(ZeRO-1) shards one shared state: choose one");
    p.Check(!model_parallel,
            absl::StrCat("optim.name = \"demo\" runs over data parallelism only for now: it "
                         "needs parallel.tp = 1 and parallel.pp = 1 (got parallel.tp = ",
                         c.parallel.tp, " and parallel.pp = ", c.parallel.pp, ")"));
  }

  // Sizes are parsed as they are read; a Config built in code must still agree with its text.
  for (const auto& [key, value] : {std::make_pair("memory.device_budget", &c.memory.device_budget),
                                   std::make_pair("memory.host_budget", &c.memory.host_budget),
                                   std::make_pair("memory.disk_budget", &c.memory.disk_budget),
                                   std::make_pair("memory.activation_budget",
                                                  &c.memory.activation_budget)}) {
    const absl::StatusOr<ByteSize> parsed = ByteSize::Parse(value->text, key);
    p.Check(parsed.ok(), std::string(parsed.status().message()));
    p.Check(!parsed.ok() || *parsed == *value,
            absl::StrCat(key, " holds ", value->bytes, " bytes for \"", value->text,
                         "\"; set it with ByteSize::Parse"));
  }
  const std::string& offload = c.memory.activation_offload;
  p.Check(offload == "auto" || offload == "never" || offload == "always",
          absl::StrCat("memory.activation_offload must be \"auto\", \"never\" or \"always\" (got \"",
                       offload, "\")"));
  p.Check(offload != "always" || !c.memory.disk_path.empty(),
          "memory.activation_offload = \"always\" writes activations under memory.disk_path, "
          "which is not set");

  const std::string& sync = c.swarm.sync;
  p.Check(sync == "auto" || sync == "fp32" || sync == "demo",
          absl::StrCat("swarm.sync must be \"auto\", \"fp32\" or \"demo\" (got \"", sync, "\")"));
  p.Check(sync != "fp32" || c.optim.name != "demo",
          "swarm.sync = \"fp32\" sums gradients for AdamW, but optim.name = \"demo\": use "
          "swarm.sync = \"demo\" (or \"auto\")");
  p.Check(std::isfinite(c.swarm.slow_link_mbit) && c.swarm.slow_link_mbit > 0,
          absl::StrCat("swarm.slow_link_mbit must be a positive number of Mb/s (got ",
                       c.swarm.slow_link_mbit, ")"));

  if (p.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("invalid config ", c.source, ": ", p.Join()));
}

absl::StatusOr<int64_t> ParseByteSize(const std::string& text, const std::string& what) {
  auto bad = [&]() {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " = \"", text,
        "\" is not a size (a number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"));
  };
  const absl::string_view t = absl::StripAsciiWhitespace(text);
  size_t end = 0;
  while (end < t.size() && (absl::ascii_isdigit(t[end]) || t[end] == '.')) ++end;
  if (end == 0) return bad();
  double number = 0;
  if (!absl::SimpleAtod(t.substr(0, end), &number) || !std::isfinite(number) || number < 0) {
    return bad();
  }
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(t.substr(end)));
  double scale = 0;
  const std::pair<const char*, double> units[] = {
      {"", 1},          {"b", 1},           {"kb", 1e3},           {"mb", 1e6},
      {"gb", 1e9},      {"tb", 1e12},       {"kib", 1024.0},       {"mib", 1048576.0},
      {"gib", 1073741824.0}, {"tib", 1099511627776.0}};
  for (const auto& [name, factor] : units) {
    if (unit == name) scale = factor;
  }
  if (scale == 0) return bad();
  const double bytes = number * scale;
  if (bytes > 4.6e18) {
    return absl::InvalidArgumentError(absl::StrCat(what, " = \"", text, "\" is too large"));
  }
  return static_cast<int64_t>(bytes);
}

absl::StatusOr<ByteSize> ByteSize::Parse(const std::string& text, const std::string& what) {
  ByteSize size;
  if (text.empty()) return size;
  SHOAL_ASSIGN_OR_RETURN(size.bytes, ParseByteSize(text, what));
  size.text = text;
  return size;
}

std::string ResolvedCheckpointDir(const Config& config) {
  if (!config.checkpoint.dir.empty()) return config.checkpoint.dir;
  absl::string_view out = config.train.out_dir;
  while (out.size() > 1 && out.back() == '/') out.remove_suffix(1);
  return absl::StrCat(out, "/checkpoints");
}

}  // namespace shoal::runtime
