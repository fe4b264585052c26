// Byte-level BPE encode throughput: documents of ~4 KB, 1 and 2 threads. Prints figures.
//   tokenizer_throughput MODEL_DIR TEXT_FILE [REPEATS]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/tokenizer/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  std::ifstream in(argv[2], std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string corpus = ss.str();
  const int repeats = argc > 3 ? std::atoi(argv[3]) : 10;
  // Documents of ~4 KB, as a dataset would feed them.
  std::vector<std::string> docs;
  for (size_t i = 0; i < corpus.size(); i += 4096) docs.push_back(corpus.substr(i, 4096));
  auto run = [&](const crossdiff::tokenizer::Tokenizer& tok, int threads, int reps) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<size_t> counts(threads, 0);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (int r = 0; r < reps; ++r)
          for (size_t d = t; d < docs.size(); d += threads) counts[t] += tok.Encode(docs[d], false)->size();
      });
    }
    for (auto& p : pool) p.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    size_t tokens = 0;
    for (size_t c : counts) tokens += c;
    std::printf("  threads=%d: %.2f MB/s, %.0f tokens/s (%zu tokens in %.3f s)\n", threads,
                corpus.size() * reps / s / 1e6, tokens / s, tokens, s);
  };
  auto t0 = std::chrono::steady_clock::now();
  auto tok = crossdiff::tokenizer::Tokenizer::Load(argv[1]);
  if (!tok.ok()) { std::fprintf(stderr, "%s\n", tok.status().ToString().c_str()); return 1; }
  std::printf("load: %.3f s, vocab %lld, corpus %.2f MB in %zu docs\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              static_cast<long long>((*tok)->vocab_size()), corpus.size() / 1e6, docs.size());
  std::printf("cold cache (first pass):\n");
  run(**tok, 1, 1);
  std::printf("warm cache:\n");
  run(**tok, 1, repeats);
  run(**tok, 2, repeats);
}
