// The manifests in deploy/kubernetes must parse, reference images that the Dockerfile builds, expose
// the ports their Services and probes use, and pass only flags that the binaries accept.
#include <yaml-cpp/yaml.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace {

const std::string kDeploy = std::string(CROSSDIFF_SOURCE_DIR) + "/deploy/kubernetes/";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string RunHelp(const std::string& binary) {
  std::string cmd = std::string(CROSSDIFF_BINARY_DIR) + "/bin/" + binary + " --help 2>&1";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  std::string out;
  std::array<char, 4096> buf{};
  while (pipe && fgets(buf.data(), buf.size(), pipe.get()) != nullptr) out += buf.data();
  return out;
}

std::vector<YAML::Node> LoadAll(const std::string& file) {
  std::vector<YAML::Node> docs = YAML::LoadAllFromFile(kDeploy + file);
  docs.erase(std::remove_if(docs.begin(), docs.end(), [](const YAML::Node& n) { return n.IsNull(); }),
             docs.end());
  return docs;
}

YAML::Node FindKind(const std::vector<YAML::Node>& docs, const std::string& kind) {
  for (const auto& d : docs) {
    if (d["kind"].as<std::string>() == kind) return d;
  }
  ADD_FAILURE() << "no " << kind;
  return YAML::Node();
}

// Image name -> Dockerfile stage, by the convention crossdiff/<stage>:<version>.
std::set<std::string> DockerfileStages() {
  std::set<std::string> stages;
  std::regex from(R"(^FROM\s+\S+\s+AS\s+(\S+))", std::regex::icase);
  std::istringstream in(ReadFile(std::string(CROSSDIFF_SOURCE_DIR) + "/Dockerfile"));
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_search(line, m, from)) stages.insert(m[1]);
  }
  return stages;
}

void CheckContainer(const YAML::Node& container, const std::string& binary,
                    const std::set<std::string>& stages) {
  std::string image = container["image"].as<std::string>();
  ASSERT_EQ(image.rfind("crossdiff/", 0), 0u) << image;
  std::string stage = image.substr(10, image.find(':') - 10);
  EXPECT_TRUE(stages.count(stage)) << "image " << image << " has no Dockerfile stage " << stage;

  std::string help = RunHelp(binary);
  ASSERT_FALSE(help.empty()) << binary << " --help printed nothing";
  for (const auto& arg : container["args"]) {
    std::string flag = arg.as<std::string>();
    ASSERT_EQ(flag.rfind("--", 0), 0u) << flag;
    flag = flag.substr(0, flag.find('='));
    EXPECT_NE(help.find(flag + " "), std::string::npos)
        << binary << " --help does not list " << flag;
  }
}

TEST(DeployManifestsTest, AllFilesParseAndKustomizationListsThem) {
  YAML::Node k = YAML::LoadFile(kDeploy + "kustomization.yaml");
  ASSERT_TRUE(k["resources"].IsSequence());
  for (const auto& r : k["resources"]) {
    std::vector<YAML::Node> docs = LoadAll(r.as<std::string>());
    EXPECT_FALSE(docs.empty()) << r.as<std::string>();
    for (const auto& d : docs) {
      EXPECT_TRUE(d["apiVersion"].IsDefined());
      EXPECT_TRUE(d["metadata"]["name"].IsDefined());
    }
  }
}

TEST(DeployManifestsTest, CoordinatorImagePortsProbesAndFlags) {
  auto docs = LoadAll("coordinator.yaml");
  YAML::Node dep = FindKind(docs, "Deployment");
  YAML::Node svc = FindKind(docs, "Service");
  YAML::Node c = dep["spec"]["template"]["spec"]["containers"][0];
  CheckContainer(c, "crossdiff-coordinator", DockerfileStages());

  std::map<std::string, int> ports;
  for (const auto& p : c["ports"]) ports[p["name"].as<std::string>()] = p["containerPort"].as<int>();
  ASSERT_TRUE(ports.count("grpc"));
  EXPECT_EQ(c["readinessProbe"]["grpc"]["port"].as<int>(), ports["grpc"]);
  EXPECT_EQ(c["livenessProbe"]["grpc"]["port"].as<int>(), ports["grpc"]);
  EXPECT_EQ(svc["spec"]["ports"][0]["targetPort"].as<std::string>(), "grpc");
  bool listen_matches = false;
  for (const auto& a : c["args"]) {
    if (a.as<std::string>() == "--listen=0.0.0.0:" + std::to_string(ports["grpc"])) listen_matches = true;
  }
  EXPECT_TRUE(listen_matches) << "--listen must use the container's grpc port";
  // The Service's selector matches the pod template.
  EXPECT_EQ(svc["spec"]["selector"]["app.kubernetes.io/name"].as<std::string>(),
            dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"].as<std::string>());
}

TEST(DeployManifestsTest, WorkerStatefulSetRequestsGpusAndUsesHeadlessService) {
  auto docs = LoadAll("worker.yaml");
  YAML::Node sts = FindKind(docs, "StatefulSet");
  YAML::Node svc = FindKind(docs, "Service");
  EXPECT_EQ(svc["spec"]["clusterIP"].as<std::string>(), "None");
  EXPECT_EQ(sts["spec"]["serviceName"].as<std::string>(), svc["metadata"]["name"].as<std::string>());
  YAML::Node c = sts["spec"]["template"]["spec"]["containers"][0];
  CheckContainer(c, "crossdiff-worker", DockerfileStages());
  EXPECT_EQ(c["resources"]["limits"]["nvidia.com/gpu"].as<int>(), 1);

  // The coordinator address in the ConfigMap names the coordinator Service and its port.
  YAML::Node cm = FindKind(LoadAll("configmap.yaml"), "ConfigMap");
  auto coord = FindKind(LoadAll("coordinator.yaml"), "Service");
  std::string expected = coord["metadata"]["name"].as<std::string>() + ":" +
                         coord["spec"]["ports"][0]["port"].as<std::string>();
  EXPECT_EQ(cm["data"]["COORDINATOR_ADDRESS"].as<std::string>(), expected);
  EXPECT_EQ(cm["data"]["RENDEZVOUS_PORT"].as<std::string>(),
            svc["spec"]["ports"][0]["port"].as<std::string>());
}

TEST(DeployManifestsTest, VolumesReferenceDeclaredClaims) {
  std::set<std::string> claims;
  for (const auto& d : LoadAll("storage.yaml")) claims.insert(d["metadata"]["name"].as<std::string>());
  for (const char* file : {"coordinator.yaml", "worker.yaml"}) {
    for (const auto& d : LoadAll(file)) {
      if (!d["spec"]["template"].IsDefined()) continue;
      for (const auto& v : d["spec"]["template"]["spec"]["volumes"]) {
        if (v["persistentVolumeClaim"].IsDefined()) {
          EXPECT_TRUE(claims.count(v["persistentVolumeClaim"]["claimName"].as<std::string>()))
              << file << ": " << v["name"].as<std::string>();
        }
      }
    }
  }
}

}  // namespace
