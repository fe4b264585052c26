#include "client/lib/client_commands.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/lib/diff_client.h"
#include "client/lib/event_printer.h"
#include "core/common/cli_args.h"
#include "proto/jobspec/job_file.h"
#include "proto/jobspec/job_spec_validation.h"

namespace crossdiff::client {
namespace {

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::string(value) : fallback;
}

// The connection flags every client command shares.
struct ConnectionFlags {
  std::string* server;
  std::string* token;
  std::string* tls_ca;
  std::string* tls_cert;
  std::string* tls_key;
  int64_t* timeout_ms;

  explicit ConnectionFlags(CommandLine& cl) {
    server = &cl.AddString("server", EnvOr("CROSSDIFF_SERVER", "127.0.0.1:50051"),
                           "coordinator HOST:PORT (env CROSSDIFF_SERVER)");
    token = &cl.AddString("token", "", "bearer token (default: env CROSSDIFF_TOKEN)");
    tls_ca = &cl.AddString("tls-ca", "", "CA certificate (PEM) to verify the coordinator: use TLS");
    tls_cert = &cl.AddString("tls-cert", "", "client certificate (PEM) for mutual TLS");
    tls_key = &cl.AddString("tls-key", "", "client private key (PEM) for mutual TLS");
    timeout_ms = &cl.AddInt("timeout-ms", 10000,
                            "deadline of unary calls (waits for the coordinator meanwhile)");
  }

  ClientOptions Options() const {
    ClientOptions options;
    options.server = *server;
    options.token = token->empty() ? EnvOr("CROSSDIFF_TOKEN", "") : *token;
    options.tls_ca_file = *tls_ca;
    options.tls_cert_file = *tls_cert;
    options.tls_key_file = *tls_key;
    options.connect_timeout_ms = static_cast<int>(*timeout_ms);
    return options;
  }
};

int Fail(FILE* err, const char* command, const std::string& server, const absl::Status& status) {
  std::string hint;
  if (absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status)) {
    // Transport errors say little on their own: name the coordinator that could not be reached.
    hint = absl::StrCat(" (coordinator ", server, ")");
  }
  std::fprintf(err, "%s: %s: %s%s\n", command, absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str(), hint.c_str());
  return 1;
}

std::string RandomRequestId() {
  std::random_device device;
  std::mt19937_64 rng((static_cast<uint64_t>(device()) << 32) ^ device());
  return absl::StrFormat("r-%016x", rng());
}

// Follows a job to its end, printing events; 0 only when it succeeded.
int FollowAndReport(DiffClient& client, const std::string& server, const std::string& job_id,
                    int64_t from, FILE* out, FILE* err, const char* command) {
  EventPrinter printer(out);
  v1::JobState final_state = v1::JOB_STATE_UNSPECIFIED;
  std::string reason;
  absl::Status status = client.FollowJob(job_id, from, [&](const v1::JobEvent& event) {
    printer.Print(event);
    final_state = event.state();
    if (event.has_phase_change()) reason = event.phase_change().reason();
    return true;
  });
  printer.Flush();
  if (!status.ok()) return Fail(err, command, server, status);
  if (final_state == v1::JOB_STATE_UNSPECIFIED) {
    // Resumed after the end: ask for the job's state.
    auto job = client.GetJob(job_id);
    if (!job.ok()) return Fail(err, command, server, job.status());
    final_state = job->state();
    reason = job->error();
  }
  if (final_state == v1::JOB_STATE_SUCCEEDED) return 0;
  std::fprintf(err, "%s: job %s %s%s%s\n", command, job_id.c_str(),
               EventPrinter::StateName(final_state).c_str(), reason.empty() ? "" : ": ",
               reason.c_str());
  return 1;
}

}  // namespace

int SubmitCommand(int argc, char** argv, FILE* out, FILE* err) {
  CommandLine cl(argv[0],
                 "submits a diff job (JSON or YAML job file) and prints its id on the first line");
  cl.SetPositionalHelp("JOB.yaml|JOB.json", 1, 1);
  ConnectionFlags connection(cl);
  auto& watch = cl.AddBool("watch", "follow the job's events; exit 0 only if it succeeds");
  auto& request_id = cl.AddString("request-id", "",
                                  "idempotency key (default: random); resubmitting with the same "
                                  "key returns the first job");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  const std::string& path = cl.positional()[0];

  // Everything the client can check is checked before a connection is made.
  absl::StatusOr<v1::JobSpec> spec = jobspec::ReadJobFile(path);
  if (!spec.ok()) {
    std::fprintf(err, "%s: %s\n", argv[0], std::string(spec.status().message()).c_str());
    return 2;
  }
  jobspec::ApplyDefaults(*spec);
  if (absl::Status valid = jobspec::ValidateJobSpec(*spec); !valid.ok()) {
    std::fprintf(err, "%s: %s: %s\n", argv[0], path.c_str(), std::string(valid.message()).c_str());
    return 2;
  }
  auto client = DiffClient::Create(connection.Options());
  if (!client.ok()) return Fail(err, argv[0], *connection.server, client.status());
  auto job = (*client)->SubmitJob(*spec, request_id.empty() ? RandomRequestId() : request_id);
  if (!job.ok()) return Fail(err, argv[0], *connection.server, job.status());
  std::fprintf(out, "%s\n", job->id().c_str());
  std::fflush(out);
  if (!watch) return 0;
  return FollowAndReport(**client, *connection.server, job->id(), 1, out, err, argv[0]);
}

int WatchCommand(int argc, char** argv, FILE* out, FILE* err) {
  CommandLine cl(argv[0], "follows a job's events until it ends; exit 0 only if it succeeded");
  cl.SetPositionalHelp("JOB", 1, 1);
  ConnectionFlags connection(cl);
  auto& from =
      cl.AddInt("from", 1, "first event sequence number to show (resume after event N with N+1)");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto client = DiffClient::Create(connection.Options());
  if (!client.ok()) return Fail(err, argv[0], *connection.server, client.status());
  return FollowAndReport(**client, *connection.server, cl.positional()[0], from, out, err, argv[0]);
}

int JobsCommand(int argc, char** argv, FILE* out, FILE* err) {
  CommandLine cl(argv[0], "lists your team's jobs, newest first");
  ConnectionFlags connection(cl);
  auto& limit = cl.AddInt("limit", 50, "at most this many jobs");
  auto& json = cl.AddBool("json", "one JSON object (proto JSON of each Job) per line");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto client = DiffClient::Create(connection.Options());
  if (!client.ok()) return Fail(err, argv[0], *connection.server, client.status());
  v1::ListJobsRequest request;
  request.set_page_size(static_cast<int32_t>(std::min<int64_t>(limit, 1000)));
  int64_t shown = 0;
  if (!json)
    std::fprintf(out, "%-20s %-11s %-24s %-20s %s\n", "ID", "STATE", "NAME", "CREATED", "PROGRESS");
  while (shown < limit) {
    auto page = (*client)->ListJobs(request);
    if (!page.ok()) return Fail(err, argv[0], *connection.server, page.status());
    for (const auto& job : page->jobs()) {
      if (shown++ >= limit) break;
      if (json) {
        std::string text;
        (void)google::protobuf::util::MessageToJsonString(job, &text);
        std::fprintf(out, "%s\n", text.c_str());
        continue;
      }
      std::string created =
          google::protobuf::util::TimeUtil::ToString(job.create_time()).substr(0, 19);
      std::string progress = job.has_progress() ? EventPrinter::FormatProgress(job.progress()) : "";
      if (!job.error().empty()) progress = job.error();
      std::fprintf(out, "%-20s %-11s %-24s %-20s %s\n", job.id().c_str(),
                   EventPrinter::StateName(job.state()).c_str(), job.spec().name().c_str(),
                   created.c_str(), progress.c_str());
    }
    if (page->next_page_token().empty()) break;
    request.set_page_token(page->next_page_token());
  }
  return 0;
}

int LatentsCommand(int argc, char** argv, FILE* out, FILE* err) {
  CommandLine cl(argv[0], "prints a finished job's per-latent statistics, ordered by delta");
  cl.SetPositionalHelp("JOB", 1, 1);
  ConnectionFlags connection(cl);
  auto& tag = cl.AddString("tag", "",
                           "only latents with this tag: base_only, finetune_only, shared, other");
  auto& order = cl.AddString("order", "asc", "delta order: asc (fine-tune-specific first) or desc");
  auto& limit = cl.AddInt("limit", 0, "at most this many latents (0 = all)");
  auto& json = cl.AddBool("json", "one JSON object (proto JSON of LatentStats) per line");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  if (order != "asc" && order != "desc") {
    std::fprintf(err, "%s: --order: must be asc or desc, got '%s'\n", argv[0], order.c_str());
    return 2;
  }
  auto client = DiffClient::Create(connection.Options());
  if (!client.ok()) return Fail(err, argv[0], *connection.server, client.status());
  v1::StreamLatentsRequest request;
  request.set_job_id(cl.positional()[0]);
  request.set_tag(tag);
  request.set_order(order == "desc" ? v1::LATENT_ORDER_DELTA_DESCENDING
                                    : v1::LATENT_ORDER_DELTA_ASCENDING);
  request.set_limit(limit);
  if (!json)
    std::fprintf(out, "index\tdelta\tdec_cos\tfreq\tmax_act\ttag\tnu_error\tnu_reconstruction\n");
  absl::Status status = (*client)->StreamLatents(request, [&](const v1::LatentPage& page) {
    for (const auto& latent : page.latents()) {
      if (json) {
        std::string text;
        (void)google::protobuf::util::MessageToJsonString(latent, &text);
        std::fprintf(out, "%s\n", text.c_str());
        continue;
      }
      std::string nu_e = latent.has_nu() ? absl::StrFormat("%.4g", latent.nu_error()) : "-";
      std::string nu_r =
          latent.has_nu() ? absl::StrFormat("%.4g", latent.nu_reconstruction()) : "-";
      std::fprintf(out, "%lld\t%.4f\t%.4f\t%.4g\t%.4g\t%s\t%s\t%s\n",
                   static_cast<long long>(latent.index()), latent.delta(), latent.dec_cos(),
                   latent.freq(), latent.max_act(), latent.tag().c_str(), nu_e.c_str(),
                   nu_r.c_str());
    }
    return true;
  });
  if (!status.ok()) return Fail(err, argv[0], *connection.server, status);
  return 0;
}

int ReportCommand(int argc, char** argv, FILE* out, FILE* err) {
  CommandLine cl(argv[0],
                 "prints a finished job's report (or writes report.json/.md/.html into --out)");
  cl.SetPositionalHelp("JOB", 1, 1);
  ConnectionFlags connection(cl);
  auto& format = cl.AddString("format", "md", "json, md or html");
  auto& out_dir =
      cl.AddString("out", "", "write all three renderings into this directory instead of printing");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  v1::ReportFormat wanted;
  if (format == "json") {
    wanted = v1::REPORT_FORMAT_JSON;
  } else if (format == "md" || format == "markdown") {
    wanted = v1::REPORT_FORMAT_MARKDOWN;
  } else if (format == "html") {
    wanted = v1::REPORT_FORMAT_HTML;
  } else {
    std::fprintf(err, "%s: --format: must be json, md or html, got '%s'\n", argv[0],
                 format.c_str());
    return 2;
  }
  auto client = DiffClient::Create(connection.Options());
  if (!client.ok()) return Fail(err, argv[0], *connection.server, client.status());
  const std::string& job_id = cl.positional()[0];
  if (out_dir.empty()) {
    auto report = (*client)->GetReport(job_id, wanted);
    if (!report.ok()) return Fail(err, argv[0], *connection.server, report.status());
    std::fwrite(report->content().data(), 1, report->content().size(), out);
    if (!report->content().empty() && report->content().back() != '\n') std::fputc('\n', out);
    return 0;
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    std::fprintf(err, "%s: --out: cannot create %s: %s\n", argv[0], out_dir.c_str(),
                 ec.message().c_str());
    return 2;
  }
  for (auto [f, name] : {std::pair{v1::REPORT_FORMAT_JSON, "report.json"},
                         std::pair{v1::REPORT_FORMAT_MARKDOWN, "report.md"},
                         std::pair{v1::REPORT_FORMAT_HTML, "report.html"}}) {
    auto report = (*client)->GetReport(job_id, f);
    if (!report.ok()) return Fail(err, argv[0], *connection.server, report.status());
    std::string path = out_dir + "/" + name;
    std::ofstream file(path, std::ios::binary);
    file << report->content();
    if (!file) {
      std::fprintf(err, "%s: --out: cannot write %s\n", argv[0], path.c_str());
      return 1;
    }
    std::fprintf(out, "%s\n", path.c_str());
  }
  return 0;
}

int CancelCommand(int argc, char** argv, FILE* out, FILE* err) {
  CommandLine cl(argv[0], "cancels a job");
  cl.SetPositionalHelp("JOB", 1, 1);
  ConnectionFlags connection(cl);
  auto& reason = cl.AddString("reason", "", "why (recorded in the job's events)");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  auto client = DiffClient::Create(connection.Options());
  if (!client.ok()) return Fail(err, argv[0], *connection.server, client.status());
  auto job = (*client)->CancelJob(cl.positional()[0], reason);
  if (!job.ok()) return Fail(err, argv[0], *connection.server, job.status());
  std::fprintf(out, "%s %s\n", job->id().c_str(), EventPrinter::StateName(job->state()).c_str());
  return 0;
}

}  // namespace crossdiff::client
