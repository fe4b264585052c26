// `crossdiff demo`: the README's main job. Makes the demo model pair from the fixtures
// (client/cli/demo_pair.h), starts a local coordinator and two workers (SQLite, local storage, Gloo),
// submits a diff job, follows it to the end and prints the summary of its report. With --local the
// same pipeline runs in this process (harvest -> train -> analyze) without the service.
#include <signal.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "client/cli/commands.h"
#include "client/cli/demo_pair.h"
#include "core/common/cli_args.h"

extern char** environ;

namespace crossdiff::cli {
namespace {
namespace fs = std::filesystem;

fs::path BinDir() { return fs::read_symlink("/proc/self/exe").parent_path(); }

// A child process of the demo (coordinator, worker or client command).
struct Child {
  pid_t pid = -1;
  std::string name;
};

Child Spawn(const std::string& name, std::vector<std::string> args, const std::string& log_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (!log_path.empty()) {
    posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  Child c;
  c.name = name;
  if (posix_spawn(&c.pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) c.pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  return c;
}

void Stop(Child& c) {
  if (c.pid <= 0) return;
  kill(c.pid, SIGTERM);
  for (int i = 0; i < 100; ++i) {
    int status;
    if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.pid = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(c.pid, SIGKILL);
  waitpid(c.pid, nullptr, 0);
  c.pid = -1;
}

// Runs a command of this binary, echoing its stdout; returns its exit code and the stdout text.
int RunSelf(const std::vector<std::string>& args, std::string* captured, bool echo) {
  std::string cmd = (BinDir() / "crossdiff").string();
  for (const auto& a : args) cmd += " '" + a + "'";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return 127;
  char buf[4096];
  while (fgets(buf, sizeof(buf), pipe) != nullptr) {
    if (captured) *captured += buf;
    if (echo) {
      std::fputs(buf, stdout);
      std::fflush(stdout);
    }
  }
  int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

nlohmann::json DemoJob(int workers) {
  return {
      {"name", "demo-llama-pair"},
      {"base_model", "models/base"},
      {"finetune_model", "models/finetune"},
      {"dataset", {{"path", "data/demo.jsonl"}, {"format", "text"}}},
      {"layer", 1},
      {"harvest", {{"max_tokens", 20000}, {"seq_len", 64}, {"batch_size", 8}, {"dtype", "float32"}}},
      {"crosscoder",
       {{"architecture", "batch_top_k"},
        {"dict_size", 256},
        {"k", 8},
        {"steps", 600},
        {"batch_size", 256},
        {"lr", 0.004}}},
      {"analysis", {{"probes_path", "data/categories.json"}}},
      {"workers", workers},
  };
}

int RunLocal(const fs::path& work, const DemoPairPaths& pair) {
  const std::string store = (work / "activations").string();
  const std::string cc = (work / "crosscoder").string();
  const std::string report = (work / "report").string();
  std::error_code ec;
  for (const auto& d : {store, cc, report}) fs::remove_all(d, ec);
  std::printf("== harvest: layer 1 of both models on the same tokens\n");
  if (int rc = RunSelf({"harvest", "--base", pair.base_dir, "--finetune", pair.finetune_dir, "--data",
                        pair.dataset, "--layer", "1", "--out", store, "--max-tokens", "20000",
                        "--seq-len", "64", "--batch", "8"},
                       nullptr, true);
      rc != 0) {
    return rc;
  }
  std::printf("== train: BatchTopK crosscoder, 256 latents, k = 8\n");
  if (int rc = RunSelf({"train", "--activations", store, "--out", cc, "--dict-size", "256", "--k", "8",
                        "--steps", "600", "--batch", "256", "--lr", "0.004"},
                       nullptr, true);
      rc != 0) {
    return rc;
  }
  std::printf("== analyze\n");
  if (int rc = RunSelf({"analyze", "--crosscoder", cc, "--activations", store, "--out", report,
                        "--categories", pair.probes},
                       nullptr, true);
      rc != 0) {
    return rc;
  }
  std::ifstream md(fs::path(report) / "report.md");
  std::stringstream ss;
  ss << md.rdbuf();
  std::printf("\n%s\nreport: %s/report.{json,md,html}\n", ss.str().c_str(), report.c_str());
  return 0;
}

int RunService(const fs::path& work, int workers) {
  const fs::path state = work / "state", data = work / "data";
  std::error_code ec;
  fs::remove_all(state, ec);
  fs::create_directories(state, ec);
  const std::string port_file = (state / "port").string();
  std::vector<Child> children;
  auto stop_all = [&] {
    for (auto it = children.rbegin(); it != children.rend(); ++it) Stop(*it);
  };
  children.push_back(Spawn("coordinator",
                           {(BinDir() / "crossdiff-coordinator").string(), "--listen", "127.0.0.1:0",
                            "--data-root", data.string(), "--state-dir", state.string(), "--port-file",
                            port_file},
                           (work / "coordinator.log").string()));
  if (children.back().pid <= 0) {
    std::fprintf(stderr, "error: cannot start crossdiff-coordinator\n");
    return 1;
  }
  std::string port;
  for (int i = 0; i < 200 && port.empty(); ++i) {
    std::ifstream in(port_file);
    std::getline(in, port);
    port = std::string(absl::StripAsciiWhitespace(port));
    if (port.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (port.empty()) {
    stop_all();
    std::fprintf(stderr, "error: the coordinator did not start (see %s)\n",
                 (work / "coordinator.log").c_str());
    return 1;
  }
  const std::string server = "127.0.0.1:" + port;
  std::printf("coordinator on %s, %d workers (logs in %s)\n", server.c_str(), workers, work.c_str());
  for (int w = 0; w < workers; ++w) {
    fs::path wd = work / absl::StrCat("worker-", w);
    fs::create_directories(wd, ec);
    children.push_back(Spawn(absl::StrCat("worker-", w),
                             {(BinDir() / "crossdiff-worker").string(), "--coordinator", server,
                              "--work-dir", wd.string(), "--name", absl::StrCat("demo-worker-", w),
                              "--threads", "1"},
                             (work / absl::StrCat("worker-", w, ".log")).string()));
  }
  const fs::path job_file = work / "job.json";
  std::ofstream(job_file) << DemoJob(workers).dump(2) << "\n";
  std::printf("submitting %s\n", job_file.c_str());
  std::string out;
  int rc = RunSelf({"submit", job_file.string(), "--server", server, "--watch"}, &out, true);
  std::string job_id = out.substr(0, out.find('\n'));
  if (rc == 0) {
    std::printf("\n");
    rc = RunSelf({"report", job_id, "--server", server, "--format", "md"}, nullptr, true);
  } else {
    std::fprintf(stderr, "error: job %s did not succeed (logs in %s)\n", job_id.c_str(), work.c_str());
  }
  stop_all();
  return rc;
}

}  // namespace

int RunDemo(int argc, char** argv) {
  CommandLine cl("crossdiff demo",
                 "The demo diff: a base/fine-tune pair made from the Llama fixture, harvested, a\n"
                 "BatchTopK crosscoder trained on it and the report printed. By default through a\n"
                 "local coordinator and workers; --local runs the same steps in this process.");
  auto& work_dir = cl.AddString("work-dir", "crossdiff-demo", "directory for the pair, state and outputs");
  auto& fixtures = cl.AddString("fixtures", DefaultFixturesDir(), "the golden fixtures directory");
  auto& workers = cl.AddInt("workers", 2, "workers to start (service mode)");
  auto& local = cl.AddBool("local", "run harvest, train and analyze in this process, without the service");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  if (workers < 1 || workers > 8) {
    std::fprintf(stderr, "error: --workers: must be between 1 and 8\n");
    return 2;
  }
  fs::path work = fs::absolute(work_dir);
  DemoPairPaths pair;
  std::printf("making the demo model pair from %s\n", fixtures.c_str());
  if (auto s = MakeDemoPair(fixtures, (work / "data").string(), &pair); !s.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return local ? RunLocal(work, pair) : RunService(work, static_cast<int>(workers));
}

}  // namespace crossdiff::cli
