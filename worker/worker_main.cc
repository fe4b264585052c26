// crossdiff-worker: leases tasks from a coordinator and runs them (DESIGN.md 3.1).
#include <signal.h>

#include <cstdio>
#include <thread>

#include "core/common/cli_args.h"
#include "worker/worker.h"

int main(int argc, char** argv) {
  crossdiff::CommandLine cl(
      "crossdiff-worker",
      "Registers with a crossdiff coordinator, leases harvest / merge / train / analyze tasks and runs\n"
      "them with the `crossdiff` engine commands. SIGTERM or SIGINT stops it (the running task's lease\n"
      "expires and the coordinator gives the task to another worker).");
  crossdiff::worker::WorkerOptions o;
  auto& coordinator = cl.AddString("coordinator", "", "coordinator address HOST:PORT", true);
  auto& work_dir = cl.AddString("work-dir", "", "directory for task logs and scratch files", true);
  auto& secret = cl.AddString("secret", "", "file holding the worker secret (--worker-secret of the coordinator)");
  auto& device = cl.AddString("device", "cpu", "cpu or cuda:N");
  auto& name = cl.AddString("name", "", "worker name (default: hostname-pid)");
  auto& advertise = cl.AddString("advertise-host", "127.0.0.1",
                                 "host name other workers reach this one at (training rendezvous)");
  auto& rdv_port = cl.AddInt("rendezvous-port", 0,
                             "port of the c10d store when this worker is rank 0 (0: ephemeral)");
  auto& threads = cl.AddInt("threads", 0, "threads per engine command (0: its default)");
  auto& binary = cl.AddString("crossdiff-bin", "", "the crossdiff binary (default: beside this one)");
  auto& tls_ca = cl.AddString("tls-ca", "", "PEM CA certificate to verify the coordinator (enables TLS)");
  auto& tls_cert = cl.AddString("tls-cert", "", "PEM client certificate (mutual TLS)");
  auto& tls_key = cl.AddString("tls-key", "", "PEM client private key (mutual TLS)");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  if (device != "cpu" && device.rfind("cuda:", 0) != 0) {
    std::fprintf(stderr, "error: --device: expected cpu or cuda:N, got '%s'\n", device.c_str());
    return 2;
  }
  o.coordinator = coordinator;
  o.work_dir = work_dir;
  o.secret_file = secret;
  o.device = device;
  o.name = name;
  o.advertise_host = advertise;
  o.rendezvous_port = static_cast<int>(rdv_port);
  o.threads = static_cast<int>(threads);
  o.crossdiff_binary = binary;
  o.tls_ca = tls_ca;
  o.tls_cert = tls_cert;
  o.tls_key = tls_key;

  // Signals are handled on a dedicated thread (sigwait), never in an async handler.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  auto worker = crossdiff::worker::Worker::Create(o);
  if (!worker.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(worker.status().message()).c_str());
    return 1;
  }
  std::thread signals([&] {
    int sig = 0;
    sigwait(&set, &sig);
    std::fprintf(stderr, "crossdiff-worker: signal %d, stopping\n", sig);
    (*worker)->Shutdown();
  });
  signals.detach();
  absl::Status s = (*worker)->Run();
  if (!s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
