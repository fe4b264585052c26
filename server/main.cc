// crossdiff-coordinator (DESIGN.md 3.1): takes diff jobs over gRPC and schedules them on workers.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/common/cli_args.h"
#include "server/coordinator_server.h"

namespace {

// Writes the bound port atomically, so a reader never sees a partial file.
bool WritePortFile(const std::string& path, int port) {
  std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp);
    out << port << "\n";
    if (!out) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl(
      "crossdiff-coordinator",
      "the crossdiff coordinator: takes diff jobs over gRPC (DiffService) and schedules their "
      "tasks on workers (WorkerService); state lives in SQLite under --state-dir");
  auto& listen =
      cl.AddString("listen", "127.0.0.1:50051", "HOST:PORT to serve on (port 0 picks a free port)");
  auto& data_root = cl.AddString(
      "data-root", "", "directory that job paths (models, datasets) resolve against", true);
  auto& state_dir =
      cl.AddString("state-dir", "", "directory of the job database (crossdiff.db)", true);
  auto& storage_root =
      cl.AddString("storage-root", "",
                   "shared directory for job outputs, seen at the same path by every worker "
                   "(default DATA_ROOT/crossdiff-jobs)");
  auto& tokens = cl.AddString(
      "tokens", "", "file of `<team> <token>` lines; without it only loopback clients are served");
  auto& worker_secret = cl.AddString(
      "worker-secret", "",
      "file holding the workers' shared secret; without it only loopback workers are served");
  auto& tls_cert = cl.AddString("tls-cert", "", "server certificate chain (PEM): serve TLS");
  auto& tls_key = cl.AddString("tls-key", "", "server private key (PEM)");
  auto& tls_client_ca = cl.AddString("tls-client-ca", "",
                                     "CA (PEM) that client certificates must chain to: mutual TLS");
  auto& port_file = cl.AddString("port-file", "", "write the bound port to this file once serving");
  auto& heartbeat_ms = cl.AddInt("heartbeat-interval-ms", 2000, "how often workers heart-beat");
  auto& lease_ms = cl.AddInt("lease-timeout-ms", 15000,
                             "a task's lease ends this long after its worker's last heartbeat");
  auto& tick_ms =
      cl.AddInt("tick-ms", 500, "how often expired leases and waiting training gangs are checked");
  auto& attempts =
      cl.AddInt("max-task-attempts", 3, "a task failing this many times fails its job");
  auto& max_jobs = cl.AddInt("max-jobs-per-team", 8, "unfinished jobs a team may have at once");
  auto& max_tokens = cl.AddInt("max-tokens", 10'000'000'000, "largest harvest.max_tokens accepted");
  auto& max_dict = cl.AddInt("max-dict-size", 1 << 20, "largest crosscoder.dict_size accepted");
  auto& max_workers = cl.AddInt("max-workers", 64, "largest `workers` accepted");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;

  crossdiff::server::CoordinatorOptions options;
  options.listen = listen;
  options.data_root = data_root;
  options.state_dir = state_dir;
  options.storage_root = storage_root;
  options.tokens_file = tokens;
  options.worker_secret_file = worker_secret;
  options.tls_cert_file = tls_cert;
  options.tls_key_file = tls_key;
  options.tls_client_ca_file = tls_client_ca;
  options.heartbeat_interval_ms = static_cast<int>(heartbeat_ms);
  options.lease_timeout_ms = static_cast<int>(lease_ms);
  options.tick_ms = static_cast<int>(tick_ms);
  options.max_task_attempts = static_cast<int>(attempts);
  options.max_active_jobs_per_team = static_cast<int>(max_jobs);
  options.limits.max_tokens = max_tokens;
  options.limits.max_dict_size = max_dict;
  options.limits.max_workers = static_cast<int32_t>(max_workers);

  // Block the stop signals in every thread (gRPC's included); the main thread waits for them below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto server = crossdiff::server::CoordinatorServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "crossdiff-coordinator: %s\n",
                 std::string(server.status().message()).c_str());
    return 1;
  }
  int port = (*server)->port();
  if (!port_file.empty() && !WritePortFile(port_file, port)) {
    std::fprintf(stderr, "crossdiff-coordinator: --port-file: cannot write %s\n",
                 port_file.c_str());
    return 1;
  }
  std::fprintf(stderr, "crossdiff-coordinator: serving on port %d (data root %s)\n", port,
               data_root.c_str());

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  std::fprintf(stderr, "crossdiff-coordinator: %s received, shutting down\n",
               signal_number == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Shutdown();
  return 0;
}
