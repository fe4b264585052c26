# crossdiff images. Three stages:
#   build        Debian 12 + the project's package list (scripts/install-deps.sh) + CUDA 13 / NCCL from
#                NVIDIA's Debian 12 repository + LibTorch 2.x (CUDA); builds every binary with the NCCL backend.
#   coordinator  slim: crossdiff-coordinator only (no LibTorch, no CUDA).
#   worker       crossdiff-worker + crossdiff with LibTorch 2.x and the CUDA runtime.
#
#   docker build --target coordinator -t crossdiff/coordinator:0.1.0 .
#   docker build --target worker      -t crossdiff/worker:0.1.0 .
ARG DEBIAN_IMAGE=debian:bookworm
ARG LIBTORCH_URL=https://download.pytorch.org/libtorch/cu126/libtorch-cxx11-abi-shared-with-deps-2.6.0%2Bcu126.zip

FROM ${DEBIAN_IMAGE} AS build
ARG LIBTORCH_URL
COPY scripts/install-deps.sh /tmp/install-deps.sh
RUN bash /tmp/install-deps.sh && apt-get install -y -qq --no-install-recommends wget unzip gnupg
# CUDA toolkit + NCCL from NVIDIA's Debian 12 repository.
RUN wget -q https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
 && dpkg -i cuda-keyring_1.1-1_all.deb && rm cuda-keyring_1.1-1_all.deb \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends cuda-toolkit-12-6 libnccl2 libnccl-dev \
 && rm -rf /var/lib/apt/lists/*
# LibTorch 2.x with CUDA; it takes precedence over Debian's CPU-only 1.13 through CMAKE_PREFIX_PATH.
RUN wget -q -O /tmp/libtorch.zip "${LIBTORCH_URL}" && unzip -q /tmp/libtorch.zip -d /opt && rm /tmp/libtorch.zip
ENV CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:${PATH}
WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=/opt/libtorch \
      -DCROSSDIFF_WITH_CUDA=ON -DCROSSDIFF_BUILD_TESTS=OFF -DCROSSDIFF_BUILD_BENCHMARKS=OFF \
 && cmake --build /build -j"$(nproc)" --target crossdiff crossdiff-coordinator crossdiff-worker crossdiff_spm

FROM ${DEBIAN_IMAGE}-slim AS coordinator
COPY scripts/install-deps.sh /tmp/install-deps.sh
RUN bash /tmp/install-deps.sh --runtime-coordinator && rm -rf /var/lib/apt/lists/* /tmp/install-deps.sh
COPY --from=build /build/bin/crossdiff-coordinator /usr/local/bin/
RUN useradd --system --uid 10001 crossdiff && mkdir -p /var/lib/crossdiff /data && chown crossdiff /var/lib/crossdiff
USER crossdiff
EXPOSE 50051
ENTRYPOINT ["crossdiff-coordinator"]
CMD ["--listen", "0.0.0.0:50051", "--data-root", "/data", "--state-dir", "/var/lib/crossdiff"]

FROM ${DEBIAN_IMAGE}-slim AS worker
COPY scripts/install-deps.sh /tmp/install-deps.sh
RUN bash /tmp/install-deps.sh --runtime-worker && rm -rf /var/lib/apt/lists/* /tmp/install-deps.sh
COPY --from=build /opt/libtorch/lib /opt/libtorch/lib
COPY --from=build /usr/local/cuda/lib64/libcudart.so* /usr/lib/x86_64-linux-gnu/libnccl.so* /opt/cuda/lib/
COPY --from=build /build/bin/crossdiff-worker /build/bin/crossdiff /usr/local/bin/
COPY --from=build /build/lib/libcrossdiff_spm.so /usr/local/lib/
ENV LD_LIBRARY_PATH=/opt/libtorch/lib:/opt/cuda/lib
RUN useradd --system --uid 10001 crossdiff && mkdir -p /work /data && chown crossdiff /work
USER crossdiff
EXPOSE 29500
ENTRYPOINT ["crossdiff-worker"]
CMD ["--coordinator", "crossdiff-coordinator:50051", "--work-dir", "/work", "--device", "cuda:0"]
