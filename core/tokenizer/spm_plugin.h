// The C interface of libcrossdiff_spm.so, the one place that links libsentencepiece.
//
// Why a plugin: Debian's libsentencepiece bundles and exports its own protobuf-lite (3.14). In a
// process that also links libprotobuf 3.21 (LibTorch, gRPC), whichever is loaded first wins the
// symbol lookups of the other: protobuf's start-up code crashes, or SentencePiece's version check
// fails. Loading the plugin with dlopen(RTLD_LOCAL | RTLD_DEEPBIND) keeps SentencePiece's protobuf
// private to it. spm_processor.cc is the only user.
//
// Buffers returned through out-parameters are malloc'ed; release them with cdspm_free_buffer.
#pragma once

#include <stddef.h>

extern "C" {
void* cdspm_new();
void cdspm_delete(void* sp);
// 1 on success; otherwise 0 and *error (malloc'ed) says why.
int cdspm_load(void* sp, const char* data, size_t size, char** error);
int cdspm_encode(void* sp, const char* text, size_t size, int** ids, size_t* count, char** error);
int cdspm_decode(void* sp, const int* ids, size_t count, char** text, size_t* size);
int cdspm_piece_size(void* sp);
int cdspm_piece_to_id(void* sp, const char* piece, size_t size);
// Pointer into the processor (valid while it lives).
const char* cdspm_id_to_piece(void* sp, int id, size_t* size);
int cdspm_is_control(void* sp, int id);
// which: 0 bos, 1 eos, 2 pad, 3 unk.
int cdspm_special_id(void* sp, int which);
char* cdspm_serialized(void* sp, size_t* size);
void cdspm_free_buffer(void* buffer);
}
