// One rank of the multi-process communicator tests: the gtests start several of these (through the
// local launcher, on 127.0.0.1 with port 0) and read what each rank prints.
//
//   comm_test_rank --scenario NAME [--victim R] [--release-file PATH] + the launch flags (launch.h)
//
// Scenarios (every rank prints one result line, then exits 0 unless said otherwise):
//   echo         prints "hello from rank R of W" on stdout and "note from rank R" on stderr
//   collectives  checks every collective over several dtypes; prints COLLECTIVES_OK or MISMATCH ...
//   fail         the victim exits 3 after a barrier; the others sleep (the launcher must stop them)
//   die          the victim _exit(7)s after a barrier; the others run an AllReduce (with
//                --pending: StartAllReduce, then Wait) and print "EXPECTED_ERROR <code>: <message>"
//   hang         the victim sleeps (until --release-file exists) instead of joining the AllReduce;
//                the others print EXPECTED_ERROR, then each append a line to the release file
//   freeze       the victim writes its pid to --release-file and stops itself (SIGSTOP: no
//                heartbeats either); the others print EXPECTED_ERROR, then SIGKILL it
#include <ATen/ATen.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/comm/collective_checks.h"
#include "core/comm/launch.h"
#include "core/common/cli_args.h"

namespace {

using crossdiff::comm::Communicator;
using crossdiff::comm::ReduceOp;

std::string Describe(const at::Tensor& t) {
  std::string s = "[";
  at::Tensor d = t.to(at::kDouble).flatten();
  for (int64_t i = 0; i < d.numel() && i < 8; ++i) {
    s += absl::StrCat(i ? ", " : "", d[i].item<double>());
  }
  return s + (d.numel() > 8 ? ", ...]" : "]");
}

// Returns "" when every collective produced the expected values, else a description.
std::string CheckCollectives(Communicator& comm) {
  const int w = comm.world_size();
  const int r = comm.rank();
  std::string problems;
  auto expect = [&](const std::string& what, absl::Status s, const at::Tensor& got,
                    const at::Tensor& want) {
    if (!s.ok()) {
      problems += absl::StrCat(what, ": ", s.ToString(), "; ");
    } else if (got.scalar_type() != want.scalar_type() || !at::equal(got, want)) {
      problems += absl::StrCat(what, ": got ", Describe(got), " want ", Describe(want), "; ");
    }
  };
  const int64_t rank_sum = static_cast<int64_t>(w) * (w - 1) / 2;

  for (at::ScalarType type :
       {at::kFloat, at::kDouble, at::kInt, at::kLong, at::kBFloat16, at::kHalf, at::kChar}) {
    const std::string name = c10::toString(type);
    at::Tensor t = (at::arange(10, at::kLong) + r).to(type);
    at::Tensor want = (at::arange(10, at::kLong) * w + rank_sum).to(type);
    expect("AllReduce sum " + name, comm.AllReduce(t, ReduceOp::kSum), t, want);

    at::Tensor m = (at::arange(6, at::kLong) * (r + 1)).to(type);
    expect("AllReduce max " + name, comm.AllReduce(m, ReduceOp::kMax), m,
           (at::arange(6, at::kLong) * w).to(type));
    at::Tensor n = (at::arange(6, at::kLong) * (r + 1)).to(type);
    expect("AllReduce min " + name, comm.AllReduce(n, ReduceOp::kMin), n,
           at::arange(6, at::kLong).to(type));

    at::Tensor in = at::full({3}, r, at::kLong).to(type);
    at::Tensor out = at::zeros({w * 3}, type);
    expect("AllGather " + name, comm.AllGather(in, out), out,
           at::arange(w, at::kLong).repeat_interleave(3).to(type));

    // Rank q contributes (q+1) * [0, 1, ..., 4w-1]; rank r receives block r of the sum.
    at::Tensor rs_in = (at::arange(4 * w, at::kLong) * (r + 1)).to(type);
    at::Tensor rs_out = at::zeros({4}, type);
    expect("ReduceScatter sum " + name, comm.ReduceScatter(rs_in, rs_out, ReduceOp::kSum), rs_out,
           (at::arange(4 * r, 4 * r + 4, at::kLong) * (rank_sum + w)).to(type));
    at::Tensor rs_max = at::zeros({4}, type);
    expect("ReduceScatter max " + name, comm.ReduceScatter(rs_in, rs_max, ReduceOp::kMax), rs_max,
           (at::arange(4 * r, 4 * r + 4, at::kLong) * w).to(type));

    at::Tensor b = at::full({5}, r, at::kLong).to(type);
    expect("Broadcast " + name, comm.Broadcast(b, w - 1), b,
           at::full({5}, w - 1, at::kLong).to(type));
  }
  // A large buffer (several transport chunks) and a 2-D tensor.
  at::Tensor big = at::full({1 << 20}, 1.0f) * (r + 1);
  expect("AllReduce 1M floats", comm.AllReduce(big), big,
         at::full({1 << 20}, static_cast<float>(rank_sum + w)));
  at::Tensor grid = at::ones({4, 3}, at::kFloat);
  at::Tensor gathered = at::zeros({w, 4, 3}, at::kFloat);
  expect("AllGather 2-D", comm.AllGather(grid, gathered), gathered, at::ones({w, 4, 3}));
  for (int i = 0; i < 3; ++i) {
    if (absl::Status s = comm.Barrier(); !s.ok()) problems += "Barrier: " + s.ToString() + "; ";
  }
  // Several all-reduces in flight at once, a blocking collective issued between them, waited for
  // out of order; one handle is dropped unwaited (its destructor waits).
  {
    std::vector<at::Tensor> parts;
    std::vector<std::unique_ptr<crossdiff::comm::PendingCollective>> pending;
    for (int i = 0; i < 4; ++i) {
      parts.push_back(at::full({(1 << 18) + i}, static_cast<float>((r + 1) * (i + 1))));
      auto p = comm.StartAllReduce(parts.back());
      if (!p.ok()) {
        problems += "StartAllReduce: " + p.status().ToString() + "; ";
        return problems;
      }
      pending.push_back(*std::move(p));
      if (i == 1) {
        at::Tensor between = at::full({7}, static_cast<float>(r));
        expect("AllReduce between started ones", comm.AllReduce(between), between,
               at::full({7}, static_cast<float>(rank_sum)));
      }
    }
    for (int i : {2, 0, 1}) {
      expect("StartAllReduce #" + std::to_string(i), pending[i]->Wait(), parts[i],
             at::full({(1 << 18) + i}, static_cast<float>((rank_sum + w) * (i + 1))));
      if (absl::Status again = pending[i]->Wait(); !again.ok()) {
        problems += "second Wait: " + again.ToString() + "; ";
      }
    }
    pending[3].reset();
    expect("StartAllReduce dropped unwaited", absl::OkStatus(), parts[3],
           at::full({(1 << 18) + 3}, static_cast<float>((rank_sum + w) * 4)));
    // An all-gather and an all-reduce in flight together.
    at::Tensor mine = at::full({(1 << 18) + 5}, static_cast<float>(r));
    at::Tensor all = at::zeros({w * ((1 << 18) + 5)});
    at::Tensor sum = at::full({33}, static_cast<float>(r));
    auto gathering = comm.StartAllGather(mine, all);
    auto reducing = comm.StartAllReduce(sum);
    if (!gathering.ok() || !reducing.ok()) {
      problems += "StartAllGather/StartAllReduce: " + gathering.status().ToString() + " / " +
                  reducing.status().ToString() + "; ";
      return problems;
    }
    expect("StartAllReduce beside StartAllGather", (*reducing)->Wait(), sum,
           at::full({33}, static_cast<float>(rank_sum)));
    expect("StartAllGather", (*gathering)->Wait(), all,
           at::arange(w, at::kFloat).repeat_interleave((1 << 18) + 5));
    // Blocks of more than 8 MiB travel as several all-gathers (here 8 MiB + 28 bytes), blocking
    // and started; the bytes counted are those of one all-gather of the whole block.
    const int64_t n = (2 << 20) + 7;
    at::Tensor block = at::arange(n, at::kFloat) + static_cast<float>(r * n);
    at::Tensor everything = at::zeros({w * n});
    const int64_t bytes_before = comm.bytes_communicated();
    expect("AllGather of 8 MiB", comm.AllGather(block, everything), everything,
           at::arange(w * n, at::kFloat));
    if (comm.backend() == "gloo" &&
        comm.bytes_communicated() - bytes_before != crossdiff::comm::RingAllGatherBytes(4 * n, w)) {
      problems += absl::StrCat("AllGather of 8 MiB counted ",
                               comm.bytes_communicated() - bytes_before, " bytes; ");
    }
    everything.zero_();
    auto pieces = comm.StartAllGather(block, everything);
    expect("StartAllGather of 8 MiB", pieces.ok() ? (*pieces)->Wait() : pieces.status(), everything,
           at::arange(w * n, at::kFloat));
    at::Tensor wrong = at::zeros({w * 3 + 1});
    auto bad_start = comm.StartAllGather(at::zeros({3}), wrong);
    if (bad_start.ok() || bad_start.status().code() != absl::StatusCode::kInvalidArgument) {
      problems +=
          "StartAllGather with a wrong output size: " + bad_start.status().ToString() + "; ";
    }
    at::Tensor half = (at::arange(5, at::kLong) + r).to(at::kBFloat16);
    auto p = comm.StartAllReduce(half);
    expect("StartAllReduce bf16", p.ok() ? (*p)->Wait() : p.status(), half,
           (at::arange(5, at::kLong) * w + rank_sum).to(at::kBFloat16));
  }
  // The shared counter: every rank adds 1 five times, interleaved with the others; every value
  // 1..5w is handed out exactly once, and once all have added (the gather) everyone reads 5w.
  {
    at::Tensor mine = at::zeros({5}, at::kLong);
    for (int i = 0; i < 5; ++i) {
      absl::StatusOr<int64_t> v = comm.AddToCounter("test/claims", 1);
      if (!v.ok()) {
        problems += "AddToCounter: " + v.status().ToString() + "; ";
        break;
      }
      mine[i] = *v;
    }
    at::Tensor all = at::zeros({5 * w}, at::kLong);
    absl::Status gathered = comm.AllGather(mine, all);  // also: every rank has added
    expect("AddToCounter values", gathered, std::get<0>(all.sort()),
           at::arange(1, 5 * w + 1, at::kLong));
    absl::StatusOr<int64_t> total = comm.AddToCounter("test/claims", 0);
    if (!total.ok() || *total != 5 * w) {
      problems += "AddToCounter after the barrier: " +
                  (total.ok() ? std::to_string(*total) : total.status().ToString()) + "; ";
    }
  }
  // Wrong shapes are rejected before any communication, naming the rank.
  at::Tensor bad_out = at::zeros({w * 3 + 1});
  absl::Status bad = comm.AllGather(at::zeros({3}), bad_out);
  if (bad.code() != absl::StatusCode::kInvalidArgument ||
      bad.message().find(absl::StrCat("rank ", r)) == std::string::npos) {
    problems += "AllGather with a wrong output size: " + bad.ToString() + "; ";
  }
  if (w > 1 && comm.bytes_communicated() <= 0) problems += "bytes_communicated is 0; ";
  if (w > 1 && comm.backend() == "gloo" && !(comm.seconds_in_collectives() > 0)) {
    problems += "seconds_in_collectives is not positive; ";
  }
  return problems;
}

}  // namespace

int main(int argc, char** argv) {
  crossdiff::CommandLine cl("comm_test_rank", "one rank of the communicator tests");
  std::string& scenario = cl.AddString("scenario", "", "what to run", true);
  int64_t& victim = cl.AddInt("victim", -1, "the rank that fails or hangs");
  std::string& release_file = cl.AddString(
      "release-file", "", "hang: stop sleeping once every other rank wrote a line to it");
  bool& pending = cl.AddBool("pending", "die/hang: the others' all-reduce is a started one");
  crossdiff::comm::LaunchFlags launch = crossdiff::comm::AddLaunchFlags(cl);
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;

  absl::StatusOr<std::optional<int>> launched = crossdiff::comm::MaybeLaunchLocal(launch);
  if (!launched.ok()) {
    std::fprintf(stderr, "error: %s\n", launched.status().ToString().c_str());
    return 2;
  }
  if (launched->has_value()) return **launched;

  absl::StatusOr<std::unique_ptr<Communicator>> connected =
      crossdiff::comm::ConnectFromFlags(launch);
  if (!connected.ok()) {
    std::printf("CONNECT_ERROR %s\n", connected.status().ToString().c_str());
    return 4;
  }
  Communicator& comm = **connected;
  const int rank = comm.rank();

  if (scenario == "echo") {
    std::printf("hello from rank %d of %d\n", rank, comm.world_size());
    std::fprintf(stderr, "note from rank %d\n", rank);
    return comm.Barrier().ok() ? 0 : 1;
  }
  if (scenario == "collectives") {
    std::string problems = CheckCollectives(comm);
    if (!problems.empty()) {
      std::printf("MISMATCH %s\n", problems.c_str());
      return 1;
    }
    std::printf("COLLECTIVES_OK bytes=%lld\n", static_cast<long long>(comm.bytes_communicated()));
    return 0;
  }
  if (scenario == "fail" || scenario == "die" || scenario == "hang" || scenario == "freeze") {
    if (absl::Status s = comm.Barrier(); !s.ok()) {
      std::printf("BARRIER_ERROR %s\n", s.ToString().c_str());
      return 5;
    }
    if (rank == victim) {
      std::fflush(stdout);
      if (scenario == "fail") return 3;
      if (scenario == "die") _exit(7);
      if (scenario == "freeze") {
        std::ofstream(release_file + ".tmp") << getpid() << "\n";
        std::rename((release_file + ".tmp").c_str(), release_file.c_str());
        raise(SIGSTOP);
        return 0;
      }
      // hang: alive (heartbeats keep going) but never enters the collective, until every other
      // rank has reported its error (one line each in the release file): released earlier, it
      // would close its communicator while a slower peer is still diagnosing the timeout.
      const auto released = [&] {
        std::ifstream in(release_file);
        int lines = 0;
        for (std::string line; std::getline(in, line);) ++lines;
        return lines >= comm.world_size() - 1;
      };
      for (int i = 0; i < 600 && !released(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      std::printf("RELEASED\n");
      return 0;
    }
    if (scenario == "fail") {
      std::this_thread::sleep_for(std::chrono::seconds(60));
      return 0;
    }
    at::Tensor t = at::ones({1000});
    absl::Status s;
    if (pending) {
      auto started = comm.StartAllReduce(t);
      s = started.ok() ? (*started)->Wait() : started.status();
    } else {
      s = comm.AllReduce(t);
    }
    std::printf("EXPECTED_ERROR %s\n", s.ToString().c_str());
    std::fflush(stdout);
    if (scenario == "hang") std::ofstream(release_file, std::ios::app) << "done\n";
    if (scenario == "freeze") {
      pid_t victim_pid = 0;
      std::ifstream(release_file) >> victim_pid;
      if (victim_pid > 0) kill(victim_pid, SIGKILL);
    }
    // A second collective fails fast with the original error.
    absl::Status again = comm.Barrier();
    std::printf("SECOND_ERROR %s\n", again.ToString().c_str());
    return s.ok() ? 1 : 0;
  }
  std::fprintf(stderr, "error: --scenario: unknown '%s'\n", scenario.c_str());
  return 2;
}
