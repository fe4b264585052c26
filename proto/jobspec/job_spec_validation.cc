#include "proto/jobspec/job_spec_validation.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"

namespace crossdiff::jobspec {
namespace {

absl::Status FieldError(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

bool IsNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

absl::Status CheckPathField(const std::string& field, const std::string& value) {
  if (value.empty()) return FieldError(field, "required");
  if (value.find('\0') != std::string::npos) return FieldError(field, "contains a NUL byte");
  return absl::OkStatus();
}

}  // namespace

void ApplyDefaults(v1::JobSpec& spec) {
  if (spec.dataset().format().empty()) spec.mutable_dataset()->set_format("text");
  auto* h = spec.mutable_harvest();
  if (h->seq_len() == 0) h->set_seq_len(128);
  if (h->batch_size() == 0) h->set_batch_size(8);
  if (h->dtype().empty()) h->set_dtype("float32");
  auto* c = spec.mutable_crosscoder();
  if (c->architecture().empty()) c->set_architecture("batch_top_k");
  if (c->k() == 0 && c->architecture() == "batch_top_k" && c->dict_size() > 0) {
    c->set_k(static_cast<int32_t>(std::min<int64_t>(32, c->dict_size())));
  }
  if (c->steps() == 0) c->set_steps(1000);
  if (c->batch_size() == 0) c->set_batch_size(4096);
  if (c->lr() == 0) c->set_lr(1e-4);
  if (c->parallelism().empty()) c->set_parallelism("data");
  if (spec.workers() == 0) spec.set_workers(1);
}

absl::Status ValidateJobSpec(const v1::JobSpec& spec) {
  if (spec.name().empty()) return FieldError("name", "required");
  if (spec.name().size() > 128) return FieldError("name", "at most 128 characters");
  for (char ch : spec.name()) {
    if (!IsNameChar(ch))
      return FieldError("name", "only letters, digits, '.', '_' and '-' are allowed");
  }
  if (auto s = CheckPathField("base_model", spec.base_model()); !s.ok()) return s;
  if (auto s = CheckPathField("finetune_model", spec.finetune_model()); !s.ok()) return s;
  if (auto s = CheckPathField("dataset.path", spec.dataset().path()); !s.ok()) return s;
  const std::string& format = spec.dataset().format();
  if (format != "text" && format != "chat" && format != "tokens") {
    return FieldError("dataset.format",
                      absl::StrCat("must be text, chat or tokens, got '", format, "'"));
  }
  if (spec.layer() < 0)
    return FieldError("layer", absl::StrCat("must be >= 0, got ", spec.layer()));

  const auto& h = spec.harvest();
  if (h.max_tokens() <= 0) {
    return FieldError("harvest.max_tokens",
                      absl::StrCat("required and must be > 0, got ", h.max_tokens()));
  }
  if (h.seq_len() < 1 || h.seq_len() > 65536) {
    return FieldError("harvest.seq_len",
                      absl::StrCat("must be between 1 and 65536, got ", h.seq_len()));
  }
  if (h.batch_size() < 1 || h.batch_size() > 65536) {
    return FieldError("harvest.batch_size",
                      absl::StrCat("must be between 1 and 65536, got ", h.batch_size()));
  }
  if (h.dtype() != "float32" && h.dtype() != "bfloat16") {
    return FieldError("harvest.dtype",
                      absl::StrCat("must be float32 or bfloat16, got '", h.dtype(), "'"));
  }
  if (h.tasks() < 0)
    return FieldError("harvest.tasks", absl::StrCat("must be >= 0, got ", h.tasks()));

  const auto& c = spec.crosscoder();
  if (c.architecture() != "batch_top_k" && c.architecture() != "relu_l1") {
    return FieldError("crosscoder.architecture",
                      absl::StrCat("must be batch_top_k or relu_l1, got '", c.architecture(), "'"));
  }
  if (c.dict_size() <= 0) {
    return FieldError("crosscoder.dict_size",
                      absl::StrCat("required and must be > 0, got ", c.dict_size()));
  }
  if (c.architecture() == "batch_top_k" && (c.k() < 1 || c.k() > c.dict_size())) {
    return FieldError("crosscoder.k", absl::StrCat("must be between 1 and dict_size (",
                                                   c.dict_size(), "), got ", c.k()));
  }
  if (c.architecture() == "relu_l1" && c.k() != 0) {
    return FieldError("crosscoder.k", "only used by batch_top_k; leave it unset for relu_l1");
  }
  if (c.steps() <= 0)
    return FieldError("crosscoder.steps", absl::StrCat("must be > 0, got ", c.steps()));
  if (c.batch_size() <= 0) {
    return FieldError("crosscoder.batch_size", absl::StrCat("must be > 0, got ", c.batch_size()));
  }
  if (!std::isfinite(c.lr()) || c.lr() <= 0) {
    return FieldError("crosscoder.lr", absl::StrCat("must be a finite number > 0, got ", c.lr()));
  }
  if (!std::isfinite(c.l1_coefficient()) || c.l1_coefficient() < 0) {
    return FieldError("crosscoder.l1_coefficient", "must be a finite number >= 0");
  }
  if (c.parallelism() != "data" && c.parallelism() != "latent") {
    return FieldError("crosscoder.parallelism",
                      absl::StrCat("must be data or latent, got '", c.parallelism(), "'"));
  }
  if (c.checkpoint_every() < 0) return FieldError("crosscoder.checkpoint_every", "must be >= 0");
  if (spec.workers() < 1)
    return FieldError("workers", absl::StrCat("must be >= 1, got ", spec.workers()));
  if (c.parallelism() == "latent" && c.dict_size() % spec.workers() != 0) {
    return FieldError(
        "crosscoder.dict_size",
        absl::StrCat("must be divisible by workers (", spec.workers(), ") for latent parallelism"));
  }
  if (spec.analysis().top_examples() < 0)
    return FieldError("analysis.top_examples", "must be >= 0");
  return absl::OkStatus();
}

}  // namespace crossdiff::jobspec
