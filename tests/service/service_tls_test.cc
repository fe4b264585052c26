// TLS and mutual TLS between the client library and a real coordinator (certificates made with the
// openssl command line for this test).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "tests/service/coordinator_process.h"

namespace crossdiff::testing {
namespace {

// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
bool MakeCertificates(const std::string& dir) {
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string script = "cd '" + dir +
                             "' && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext && "
                             "openssl req -x509 " +
                             key +
                             " -keyout ca.key -out ca.pem -days 2 -subj /CN=crossdiff-test-ca && "
                             "openssl req " +
                             key +
                             " -keyout server.key -out server.csr -subj /CN=localhost && "
                             "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key "
                             "-CAcreateserial -out server.pem -days 2 "
                             "-extfile san.ext && "
                             "openssl req " +
                             key +
                             " -keyout client.key -out client.csr -subj /CN=crossdiff-client && "
                             "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key "
                             "-CAcreateserial -out client.pem -days 2";
  return std::system(("(" + script + ") >/dev/null 2>&1").c_str()) == 0;
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(MakeCertificates(certs_.path())) << "openssl failed";
    const std::string d = certs_.path() + "/";
    coordinator_ = std::make_unique<CoordinatorProcess>(
        true, std::vector<std::string>{"--tls-cert", d + "server.pem", "--tls-key",
                                       d + "server.key", "--tls-client-ca", d + "ca.pem"});
    coordinator_->Start();
  }

  absl::StatusOr<v1::ListJobsResponse> List(const client::ClientOptions& base) {
    client::ClientOptions options = base;
    options.server = coordinator_->address();
    options.token = "tok-a";
    options.connect_timeout_ms = 3000;
    auto client = client::DiffClient::Create(options);
    if (!client.ok()) return client.status();
    return (*client)->ListJobs(v1::ListJobsRequest());
  }

  TempDir certs_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
};

TEST_F(TlsTest, MutualTlsClientIsServed) {
  client::ClientOptions options;
  options.tls_ca_file = certs_.path() + "/ca.pem";
  options.tls_cert_file = certs_.path() + "/client.pem";
  options.tls_key_file = certs_.path() + "/client.key";
  auto list = List(options);
  EXPECT_TRUE(list.ok()) << list.status();
}

TEST_F(TlsTest, ClientWithoutCertificateOrWithoutTlsIsRefused) {
  client::ClientOptions no_certificate;
  no_certificate.tls_ca_file = certs_.path() + "/ca.pem";
  EXPECT_FALSE(List(no_certificate).ok());
  EXPECT_FALSE(List(client::ClientOptions()).ok());  // plaintext against a TLS port
}

TEST(TlsFlagsTest, ClientCertificateWithoutKeyIsAFlagError) {
  client::ClientOptions options;
  options.tls_cert_file = "/nonexistent/client.pem";
  auto client = client::DiffClient::Create(options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(client.status().message()),
              ::testing::HasSubstr("--tls-cert and --tls-key"));
}

}  // namespace
}  // namespace crossdiff::testing
