// The report types and renderings: tags and the relative norm against hand computation, the JSON
// schema of DESIGN.md 3.5, Markdown and HTML contents, and the probe categories file.
#include "core/analysis/report.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include "core/analysis/probe_categories.h"

namespace crossdiff::analysis {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(RelativeDecoderNormTest, MatchesTheFormula) {
  EXPECT_DOUBLE_EQ(RelativeDecoderNorm(0.0, 1.0), 0.0);  // fine-tune only
  EXPECT_DOUBLE_EQ(RelativeDecoderNorm(2.0, 0.0), 1.0);  // base only
  EXPECT_DOUBLE_EQ(RelativeDecoderNorm(3.0, 3.0), 0.5);
  // 0.5 * ((1 - 4) / 4 + 1) = 0.125
  EXPECT_DOUBLE_EQ(RelativeDecoderNorm(1.0, 4.0), 0.125);
  EXPECT_DOUBLE_EQ(RelativeDecoderNorm(4.0, 1.0), 0.875);
  EXPECT_DOUBLE_EQ(RelativeDecoderNorm(0.0, 0.0), 0.5);
}

TEST(TagForDeltaTest, UsesTheDesignThresholds) {
  EXPECT_EQ(TagForDelta(0.0), LatentTag::kFinetuneOnly);
  EXPECT_EQ(TagForDelta(0.0999), LatentTag::kFinetuneOnly);
  EXPECT_EQ(TagForDelta(0.1), LatentTag::kOther);
  EXPECT_EQ(TagForDelta(0.4001), LatentTag::kShared);
  EXPECT_EQ(TagForDelta(0.5), LatentTag::kShared);
  EXPECT_EQ(TagForDelta(0.5999), LatentTag::kShared);
  EXPECT_EQ(TagForDelta(0.6), LatentTag::kOther);
  EXPECT_EQ(TagForDelta(0.4), LatentTag::kOther);
  EXPECT_EQ(TagForDelta(0.9), LatentTag::kOther);
  EXPECT_EQ(TagForDelta(0.9001), LatentTag::kBaseOnly);
  EXPECT_EQ(TagForDelta(1.0), LatentTag::kBaseOnly);
  EXPECT_EQ(TagForDelta(std::nan("")), LatentTag::kOther);
  for (LatentTag t :
       {LatentTag::kBaseOnly, LatentTag::kFinetuneOnly, LatentTag::kShared, LatentTag::kOther}) {
    auto parsed = ParseTag(TagName(t));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, t);
  }
  EXPECT_THAT(ParseTag("chat_only").status().message(), HasSubstr("chat_only"));
}

Report SampleReport() {
  Report r;
  const double deltas[] = {0.02, 0.5, 0.97, 0.3, 0.05};
  for (int i = 0; i < 5; ++i) {
    LatentReport l;
    l.index = i;
    l.delta = deltas[i];
    l.dec_cos = 0.1 * i;
    l.freq = i == 3 ? 0.0 : 0.01 * (i + 1);
    l.max_act = 1.5 * i;
    l.tag = TagForDelta(l.delta);
    if (l.tag == LatentTag::kFinetuneOnly || l.tag == LatentTag::kBaseOnly) {
      l.latent_scaling_computed = true;
      l.nu_error = 0.05 * (i + 1);
      l.nu_reconstruction = 0.02;
    }
    if (l.freq > 0) {
      TopExample e;
      e.activation = 2.5;
      e.row = 10 + i;
      e.sequence_id = 3;
      e.position = 7;
      e.token_id = 42;
      e.context_token_ids = {40, 41, 42, 43};
      e.context_index = 2;
      e.has_text = i == 0;
      e.token_text = "<b>|";
      e.context_text = "say <b>| now";
      l.top_examples.push_back(e);
    }
    r.latents.push_back(l);
  }
  r.summary.models = {"base-model", "chat-model"};
  r.summary.layer = 3;
  r.summary.rows = 1000;
  r.summary.fvu = {0.12, 0.15};
  r.summary.l0 = 4.5;
  r.summary.dead_latents = 1;
  r.summary.latent_scaling_tags = {"finetune_only", "base_only"};
  CapabilityReport c;
  c.category = "math";
  c.tokens = 100;
  c.base_mass = 0.5;
  c.finetune_mass = 0.75;
  c.change_percent = 50.0;
  c.latents = {0, 4};
  r.capabilities.push_back(c);
  SummarizeTags(r);
  return r;
}

TEST(SummarizeTagsTest, CountsAndHistogram) {
  Report r = SampleReport();
  EXPECT_EQ(r.summary.counts["finetune_only"], 2);
  EXPECT_EQ(r.summary.counts["base_only"], 1);
  EXPECT_EQ(r.summary.counts["shared"], 1);
  EXPECT_EQ(r.summary.counts["other"], 1);
  EXPECT_EQ(r.summary.num_latents, 5);
  EXPECT_EQ(r.summary.delta_histogram[0], 1);   // 0.02
  EXPECT_EQ(r.summary.delta_histogram[1], 1);   // 0.05
  EXPECT_EQ(r.summary.delta_histogram[6], 1);   // 0.3
  EXPECT_EQ(r.summary.delta_histogram[10], 1);  // 0.5
  EXPECT_EQ(r.summary.delta_histogram[19], 1);  // 0.97
}

TEST(ReportJsonTest, HasTheContractFields) {
  const Report r = SampleReport();
  const nlohmann::json j = nlohmann::json::parse(ReportToJson(r));
  ASSERT_TRUE(j["latents"].is_array());
  ASSERT_EQ(j["latents"].size(), 5u);
  for (const auto& l : j["latents"]) {
    for (const char* key : {"index", "delta", "dec_cos", "freq", "max_act", "tag", "nu_error",
                            "nu_reconstruction", "top_examples"}) {
      EXPECT_TRUE(l.contains(key)) << key;
    }
  }
  EXPECT_EQ(j["latents"][0]["tag"], "finetune_only");
  EXPECT_DOUBLE_EQ(j["latents"][0]["nu_error"].get<double>(), 0.05);
  EXPECT_TRUE(j["latents"][1]["nu_error"].is_null());  // shared: not computed
  EXPECT_TRUE(j["latents"][1]["nu_reconstruction"].is_null());
  const auto& ex = j["latents"][0]["top_examples"][0];
  for (const char* key : {"activation", "sequence_id", "position", "token_id", "context_token_ids",
                          "context_index", "context_text"}) {
    EXPECT_TRUE(ex.contains(key)) << key;
  }
  EXPECT_EQ(ex["context_text"], "say <b>| now");
  EXPECT_TRUE(j["latents"][1]["top_examples"][0]["context_text"].is_null());
  const auto& s = j["summary"];
  for (const char* tag : {"base_only", "finetune_only", "shared", "other"}) {
    EXPECT_TRUE(s["counts"].contains(tag)) << tag;
  }
  EXPECT_EQ(s["fvu"].size(), 2u);
  EXPECT_DOUBLE_EQ(s["l0"].get<double>(), 4.5);
  ASSERT_EQ(j["capabilities"].size(), 1u);
  for (const char* key : {"category", "base_mass", "finetune_mass", "change_percent", "latents"}) {
    EXPECT_TRUE(j["capabilities"][0].contains(key)) << key;
  }
}

TEST(ReportJsonTest, NonFiniteNumbersBecomeNull) {
  Report r = SampleReport();
  r.latents[0].delta = std::nan("");
  r.latents[0].nu_error = INFINITY;
  const nlohmann::json j = nlohmann::json::parse(ReportToJson(r));
  EXPECT_TRUE(j["latents"][0]["delta"].is_null());
  EXPECT_TRUE(j["latents"][0]["nu_error"].is_null());
}

TEST(ReportJsonTest, InvalidUtf8TextIsReplacedNotFatal) {
  Report r = SampleReport();
  r.latents[0].top_examples[0].context_text = std::string("ab\xBF\xC3");
  const nlohmann::json j = nlohmann::json::parse(ReportToJson(r));
  EXPECT_EQ(j["latents"][0]["top_examples"][0]["context_text"], "ab\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(ReportJsonTest, RoundTrips) {
  const Report r = SampleReport();
  auto back = ReportFromJson(ReportToJson(r));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(ReportToJson(*back), ReportToJson(r));
}

TEST(ReportJsonTest, RejectsMissingFieldsByName) {
  nlohmann::json j = nlohmann::json::parse(ReportToJson(SampleReport()));
  j["latents"][2].erase("freq");
  auto back = ReportFromJson(j.dump());
  EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(back.status().message(), HasSubstr("latents[2].freq"));
  EXPECT_EQ(ReportFromJson("[1,2").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(RenderMarkdownTest, HasCountsHistogramAndFineTuneLatents) {
  const std::string md = RenderMarkdown(SampleReport());
  EXPECT_THAT(md, HasSubstr("| finetune_only | 2 |"));
  EXPECT_THAT(md, HasSubstr("| base_only | 1 |"));
  EXPECT_THAT(md, HasSubstr("[0.00, 0.05)"));
  EXPECT_THAT(md, HasSubstr("[0.95, 1.00]"));
  EXPECT_THAT(md, HasSubstr("## Most fine-tune-specific latents"));
  // Latent 0 (delta 0.02) is listed before latent 4 (delta 0.05); its text is escaped for tables.
  const size_t l0 = md.find("| 0 | 0.020");
  const size_t l4 = md.find("| 4 | 0.050");
  ASSERT_NE(l0, std::string::npos);
  ASSERT_NE(l4, std::string::npos);
  EXPECT_LT(l0, l4);
  EXPECT_THAT(md, HasSubstr("\\<b\\>\\|"));
  EXPECT_THAT(md, HasSubstr("| math | 100 |"));
  EXPECT_THAT(md, HasSubstr("+50.0%"));
}

TEST(RenderHtmlTest, IsSelfContainedWithPlots) {
  const std::string html = RenderHtml(SampleReport());
  EXPECT_THAT(html, HasSubstr("<!DOCTYPE html>"));
  EXPECT_THAT(html, HasSubstr("aria-label='delta histogram'"));
  EXPECT_THAT(html, HasSubstr("aria-label='delta versus decoder cosine'"));
  EXPECT_THAT(html, HasSubstr("<circle"));
  EXPECT_THAT(html, Not(HasSubstr("<script")));
  EXPECT_THAT(html, Not(HasSubstr("src=")));
  EXPECT_THAT(html, Not(HasSubstr("href=")));
  EXPECT_THAT(html, Not(HasSubstr("<b>|")));  // user text is escaped
  EXPECT_THAT(html, HasSubstr("&lt;b&gt;|"));
}

TEST(ProbeCategoriesTest, ParsesAllForms) {
  auto cats = ParseProbeCategories(
      R"({"math": [3, 5], "code": ["def ", "return"],
          "mixed": {"sequence_ids": [1], "substrings": ["x"]}})",
      "cats.json");
  ASSERT_TRUE(cats.ok()) << cats.status();
  ASSERT_EQ(cats->size(), 3u);
  EXPECT_EQ((*cats)[0].name, "math");  // file order
  EXPECT_EQ((*cats)[0].sequence_ids, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ((*cats)[1].substrings, (std::vector<std::string>{"def ", "return"}));
  EXPECT_EQ((*cats)[2].sequence_ids, (std::vector<int64_t>{1}));
  EXPECT_EQ((*cats)[2].substrings, (std::vector<std::string>{"x"}));
}

TEST(ProbeCategoriesTest, RejectsBadFilesNamingTheCategory) {
  auto bad = ParseProbeCategories(R"({"math": []})", "cats.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("cats.json: category 'math'"));
  bad = ParseProbeCategories(R"({"math": {"ids": [1]}})", "cats.json");
  EXPECT_THAT(bad.status().message(), HasSubstr("unknown field 'ids'"));
  bad = ParseProbeCategories(R"({"math": [1.5]})", "cats.json");
  EXPECT_THAT(bad.status().message(), HasSubstr("unexpected element 1.5"));
  bad = ParseProbeCategories(R"([1])", "cats.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  bad = ParseProbeCategories("{", "cats.json");
  EXPECT_THAT(bad.status().message(), HasSubstr("not valid JSON"));
  EXPECT_EQ(LoadProbeCategories("/nonexistent/cats.json").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace crossdiff::analysis
