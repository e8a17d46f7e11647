/* infinichat native decode step: one token through a Llama-family model with int8/int4 weights, on CPU.

   Built on the user's machine at first use (native/__init__.py: gcc -O3 -mavx2 -mfma -fopenmp), loaded with
   ctypes. Everything of one token runs inside one OpenMP parallel region (the worksharing loops below bind to
   it), so a decode step costs one fork/join instead of one per PyTorch op, and no Python runs per layer.

   Weights stay in the formats model/quant.py makes (nothing is copied):
     int8 per row    q (N, K) int8, scale (N,) bf16              w = q * scale
     int8 per group  q (N, K) int8, sz (N, K/32, 2) bf16         w = q * s + z, s/z per row and 32 inputs
     int4            nibbles (N, K/2) uint8, sz (N, K/32, 2) bf16 w = (nib - 8) * s + z, s/z as above;
                     byte j of a group holds input 2j (low nibble) and 2j+1 (high nibble)
   Activations are quantized to int8 per block of 32 (one float scale per block, as GGUF's Q8 does) so the
   products run as integer multiply-adds (AVX2 maddubs): 32 weights per few instructions, and decode stays
   bound by reading the weights. The zero terms (int4, grouped int8) use the exact float sum of each activation
   block. The same row products serve multi-token calls of the PyTorch path (ic_matmul, end of file).

   The KV cache is the KV store's own buffers (Hkv, capacity, hd) per layer: bf16, int8 codes with a float32
   scale per row, or int4 KIVI groups plus a bf16 residual of the newest slots, keys optionally Hadamard-rotated
   (KVView, ic_decode_kv): the new key/value rows are written at slot `start` (int8: quantized here; int4: into
   the residual) and attention reads slots [0, start], each format's codes directly (int4 with AVX-512 where the
   CPU has it). Attention is split over the threads by key slots (flash-decoding): each thread keeps a running
   max, sum and weighted value sum per query head over its slots, in blocks of ABLK, and the partial results are
   merged at the end. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QB 32          /* activation / int4 block */
#define ABLK 64        /* attention key block */
#define MAX_THREADS 32
#define MAX_HD 256
#define MAX_HEADS 128
#define MAX_GROUP 16    /* query heads per KV head */

enum { KIND_INT4 = 4, KIND_INT8 = 8, KIND_INT8_GROUP = 9 };

typedef struct {
    int32_t kind;          /* KIND_* */
    int32_t n, k;          /* rows (outputs), inputs */
    const uint8_t *q;      /* int4: (N, K/2) nibbles; int8: (N, K) int8 */
    const uint16_t *s;     /* int4, grouped int8: (N, K/32, 2) bf16 scale, zero; int8: (N,) bf16 scale */
    const float *bias;     /* (N,) float32 or NULL */
} Mat;

typedef struct {
    const float *attn_norm, *ffn_norm; /* (D,) float32 */
    Mat wqkv, wo, win, wout;
} Layer;

typedef struct {
    int32_t n_layers, dim, n_heads, n_kv, head_dim, ffn, vocab;
    float eps, attn_scale;
    const uint16_t *embed;   /* (V, D) bf16 */
    const float *final_norm; /* (D,) float32 */
    Mat head;                /* int8 (V, D) */
    const Layer *layers;
} Model;

/* ------------------------------------------------------------------------------------------- helpers */
static inline float bf16_f32(uint16_t h) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)h << 16;
    return c.f;
}

static inline uint16_t f32_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40); /* NaN stays NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x = 2^n e^r with n = round(x log2 e), r = x - n ln2 (ln2 in two parts, the second one's product exact
   enough), e^r by its degree-6 Taylor polynomial (|r| <= ln2/2: relative error < 2e-7). Written once for
   both vector widths (AVX2 here, AVX-512 in the prompt attention). */
#define LOG2E 1.44269504088896341f
#define EXP_REDUCE(FNMADD, SET1, n, x) FNMADD(n, SET1(1.428606765330187045e-06f), FNMADD(n, SET1(0.693145751953125f), x))
#define EXP_POLY(FMA, SET1, r)                                                                                 \
    FMA(FMA(FMA(FMA(FMA(FMA(SET1(1.0f / 720), r, SET1(1.0f / 120)), r, SET1(1.0f / 24)), r, SET1(1.0f / 6)), r, \
                SET1(0.5f)), r, SET1(1.0f)), r, SET1(1.0f))

/* e^x for x <= 0 (softmax arguments): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial of
   e^r (relative error < 2e-7); arguments below -87 flush to 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = EXP_REDUCE(_mm256_fnmadd_ps, _mm256_set1_ps, n, x);
    __m256 p = EXP_POLY(_mm256_fmadd_ps, _mm256_set1_ps, r);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

/* AVX-512 code (the prompt attention, int4 KV scores): compiled for it, run only where the CPU has it */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

AVX512 static inline __m512 exp16(__m512 x) { /* e^x for x <= 0, below -87 -> 0; same polynomial as exp8 */
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = EXP_REDUCE(_mm512_fnmadd_ps, _mm512_set1_ps, n, x);
    __m512 p = EXP_POLY(_mm512_fmadd_ps, _mm512_set1_ps, r);
    return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
}

/* thread `t` of `nt`: its share [*a, *b) of n items, in whole units of `unit` */
static inline void share(int64_t n, int unit, int t, int nt, int64_t *a, int64_t *b) {
    int64_t units = (n + unit - 1) / unit;
    int64_t ua = units * t / nt, ub = units * (t + 1) / nt;
    *a = ua * unit < n ? ua * unit : n;
    *b = ub * unit < n ? ub * unit : n;
}

/* ------------------------------------------------------------------------------------------- activations */
typedef struct {      /* one activation row quantized per block of 32 */
    int8_t *q;        /* x ~ d * (q + q2 / 128) */
    int8_t *q2;       /* the rounding residual of q, in steps of d / 128 */
    float *d;         /* per-block scale */
    float *sum;       /* exact per-block sum (the zero terms) */
} Act;

typedef struct {      /* storage for one Act of up to 2^16 inputs (the decode step's) */
    int8_t q[1 << 16], q2[1 << 16];
    float d[(1 << 16) / QB], sum[(1 << 16) / QB];
} QAct;

static inline Act act_in(QAct *s) { return (Act){s->q, s->q2, s->d, s->sum}; }

/* x (k,) -> int8 blocks of 32. `split`: each block stored as its even inputs then its odd inputs, matching the
   int4 nibble order (low nibbles = even inputs). */
/* the largest |x| of a block of 32 and its sum */
static inline float block_stats(const float *xb, float *sum) {
    __m256 m = _mm256_setzero_ps(), s = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < QB; i += 8) {
        __m256 v = _mm256_loadu_ps(xb + i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        s = _mm256_add_ps(s, v);
    }
    *sum = hsum8(s);
    return hmax8(m);
}

static void quantize_act(const float *x, int k, int split, const Act *out) {
    for (int g = 0; g < k / QB; g++) {
        const float *xb = x + g * QB;
        float amax = block_stats(xb, &out->sum[g]);
        float d = amax / 127.0f;
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        out->d[g] = d;
        int8_t *q = out->q + g * QB, *q2 = out->q2 + g * QB;
        for (int i = 0; i < QB; i++) {
            int dst = split ? (i & 1) * (QB / 2) + i / 2 : i;
            float v = xb[i] * inv;
            float r = rintf(v);
            q[dst] = (int8_t)r;
            q2[dst] = (int8_t)rintf((v - r) * 128.0f);  /* |v - r| <= 1/2: in [-64, 64] */
        }
    }
}

/* ------------------------------------------------------------------------------------------- mat-vec */
static inline __m256i dot_i8_32(__m256i w_u8, __m256i x_s8) { /* 8 int32 partial sums of 32 u8*s8 products */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, x_s8), _mm256_set1_epi16(1));
}

/* sum of w * (x + x2 / 128), scaled by 128 (exact in int32): the two-level activation's product */
static inline __m256i dot2_i8_32(__m256i w_u8, const int8_t *x, const int8_t *x2) {
    __m256i p1 = dot_i8_32(w_u8, _mm256_loadu_si256((const __m256i *)x));
    __m256i p2 = dot_i8_32(w_u8, _mm256_loadu_si256((const __m256i *)x2));
    return _mm256_add_epi32(_mm256_slli_epi32(p1, 7), p2);
}

static inline __m256i unpack_nibbles(const uint8_t *p) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(b, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm256_set_m128i(hi, lo);
}

/* The row products' float steps, shared with the batched step's kernels (which must give the same bits): each
   group's integer product sum is made exact first (`isum`: 128 x the sum of w * (x + x2 / 128) over its 32
   inputs), then groups g, g+1, g+2, g+3 go to the 4 lanes of a float accumulator, lane g % 4:
     int4:  acc[g % 4] = fma(isum, s * (d / 128), acc); acc[g % 4] = fma(z - 8 s, sum, acc)
     int8:  acc[g % 4] = fma(isum, d / 128, acc)            (the row's scale applied once at the end)
   and the row's result is hsum4(acc) = (acc0 + acc2) + (acc1 + acc3). */

/* the exact sums of the 8 int32 lanes of v0..v3: (4,) */
static inline __m128i group_sums4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

static inline float hsum4(__m128 s) { /* (s0 + s2) + (s1 + s3) */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the int4 float step of 4 groups: sz8 their 4 (scale, zero) bf16 pairs, d / sum their activation blocks' */
static inline __m128 int4_step4(__m128 acc, __m128i isum, __m128i sz8, __m128 d, __m128 sum) {
    const __m128 s = _mm_castsi128_ps(_mm_slli_epi32(sz8, 16));
    const __m128 z = _mm_castsi128_ps(_mm_and_si128(sz8, _mm_set1_epi32((int)0xffff0000u)));
    const __m128 zs = _mm_sub_ps(z, _mm_mul_ps(_mm_set1_ps(8.0f), s)); /* 8 s is exact: one rounding */
    acc = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(s, _mm_mul_ps(d, _mm_set1_ps(1.0f / 128))), acc);
    return _mm_fmadd_ps(zs, sum, acc);
}

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* the last G % 4 groups' operands of a row, zeros in the lanes past G (each such lane's step adds exactly 0) */
typedef struct {
    int32_t isum[4];
    uint16_t sz[8];
    float d[4], sum[4];
} Tail4;

/* row r against NA activation rows a[0..NA): out[j] = row_int4 of a[j] (the row's nibbles unpacked once) */
static inline __attribute__((always_inline)) void rows_int4(const Mat *m, int64_t r, const Act *a, float *out,
                                                           const int NA) {
    const int G = m->k / QB;
    const uint8_t *w = m->q + r * (m->k / 2);
    const uint16_t *sz = m->s + r * G * 2;
    __m128 acc[4];
    for (int j = 0; j < NA; j++) acc[j] = _mm_setzero_ps();
    int g = 0;
    for (; g + 4 <= G; g += 4) {
        __m256i wu[4];
        for (int i = 0; i < 4; i++) wu[i] = unpack_nibbles(w + 16 * (g + i));
        const __m128i sz8 = _mm_loadu_si128((const __m128i *)(sz + 2 * g));
        for (int j = 0; j < NA; j++) {
            __m256i v[4];
            for (int i = 0; i < 4; i++) v[i] = dot2_i8_32(wu[i], a[j].q + QB * (g + i), a[j].q2 + QB * (g + i));
            acc[j] = int4_step4(acc[j], group_sums4(v[0], v[1], v[2], v[3]), sz8, _mm_loadu_ps(a[j].d + g),
                                _mm_loadu_ps(a[j].sum + g));
        }
    }
    for (int j = 0; j < NA; j++) {
        if (g < G) {
            Tail4 t;
            memset(&t, 0, sizeof t);
            for (int i = 0; g + i < G; i++) {
                t.isum[i] = hsum_epi32(dot2_i8_32(unpack_nibbles(w + 16 * (g + i)), a[j].q + QB * (g + i), a[j].q2 + QB * (g + i)));
                t.sz[2 * i] = sz[2 * (g + i)], t.sz[2 * i + 1] = sz[2 * (g + i) + 1];
                t.d[i] = a[j].d[g + i], t.sum[i] = a[j].sum[g + i];
            }
            acc[j] = int4_step4(acc[j], _mm_loadu_si128((const __m128i *)t.isum), _mm_loadu_si128((const __m128i *)t.sz),
                                _mm_loadu_ps(t.d), _mm_loadu_ps(t.sum));
        }
        out[j] = hsum4(acc[j]);
    }
}

static float row_int4(const Mat *m, int64_t r, const Act *a) {
    float out;
    rows_int4(m, r, a, &out, 1);
    return out;
}

/* int8 weights: u8 x s8 products as |w| times x with w's sign. w in [-128, 127]: |-128| is 128 as a u8, and
   128 * 127 * 2 still fits maddubs' saturating int16 sums */
static inline __m256i dot2_s8_32(const int8_t *w, const int8_t *x, const int8_t *x2) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    __m256i aw = _mm256_sign_epi8(wv, wv);
    __m256i p1 = dot_i8_32(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x), wv));
    __m256i p2 = dot_i8_32(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x2), wv));
    return _mm256_add_epi32(_mm256_slli_epi32(p1, 7), p2);
}

/* row r against NA activation rows: out[j] = row_int8 of a[j] */
static inline __attribute__((always_inline)) void rows_int8(const Mat *m, int64_t r, const Act *a, float *out,
                                                           const int NA) {
    const int G = m->k / QB;
    const int8_t *w = (const int8_t *)m->q + r * m->k;
    const __m128 inv = _mm_set1_ps(1.0f / 128);
    __m128 acc[4];
    for (int j = 0; j < NA; j++) acc[j] = _mm_setzero_ps();
    int g = 0;
    for (; g + 4 <= G; g += 4)
        for (int j = 0; j < NA; j++) {
            __m256i v[4];
            for (int i = 0; i < 4; i++) v[i] = dot2_s8_32(w + QB * (g + i), a[j].q + QB * (g + i), a[j].q2 + QB * (g + i));
            acc[j] = _mm_fmadd_ps(_mm_cvtepi32_ps(group_sums4(v[0], v[1], v[2], v[3])),
                                  _mm_mul_ps(_mm_loadu_ps(a[j].d + g), inv), acc[j]);
        }
    for (int j = 0; j < NA; j++) {
        if (g < G) {
            Tail4 t;
            memset(&t, 0, sizeof t);
            for (int i = 0; g + i < G; i++) {
                t.isum[i] = hsum_epi32(dot2_s8_32(w + QB * (g + i), a[j].q + QB * (g + i), a[j].q2 + QB * (g + i)));
                t.d[i] = a[j].d[g + i];
            }
            acc[j] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)t.isum)),
                                  _mm_mul_ps(_mm_loadu_ps(t.d), inv), acc[j]);
        }
        out[j] = hsum4(acc[j]) * bf16_f32(m->s[r]);
    }
}

static float row_int8(const Mat *m, int64_t r, const Act *a) {
    float out;
    rows_int8(m, r, a, &out, 1);
    return out;
}

static float row_int8_group(const Mat *m, int64_t r, const Act *a) {
    const int G = m->k / QB;
    const int8_t *w = (const int8_t *)m->q + r * m->k;
    const uint16_t *sz = m->s + r * G * 2;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float zacc = 0.0f;
    int g = 0;
    for (; g + 1 < G; g += 2) {
        __m256i p0 = dot2_s8_32(w + QB * g, a->q + QB * g, a->q2 + QB * g);
        __m256i p1 = dot2_s8_32(w + QB * (g + 1), a->q + QB * (g + 1), a->q2 + QB * (g + 1));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(bf16_f32(sz[2 * g]) * a->d[g]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(bf16_f32(sz[2 * g + 2]) * a->d[g + 1]), acc1);
        zacc += bf16_f32(sz[2 * g + 1]) * a->sum[g] + bf16_f32(sz[2 * g + 3]) * a->sum[g + 1];
    }
    for (; g < G; g++) {
        __m256i p0 = dot2_s8_32(w + QB * g, a->q + QB * g, a->q2 + QB * g);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(bf16_f32(sz[2 * g]) * a->d[g]), acc0);
        zacc += bf16_f32(sz[2 * g + 1]) * a->sum[g];
    }
    return hsum8(_mm256_add_ps(acc0, acc1)) * (1.0f / 128) + zacc;
}

static inline float row_dot(const Mat *m, int64_t r, const Act *a) {
    switch (m->kind) {
    case KIND_INT4: return row_int4(m, r, a);
    case KIND_INT8_GROUP: return row_int8_group(m, r, a);
    default: return row_int8(m, r, a);
    }
}

/* y = W x (+ bias) (+ y if `accumulate`), rows split over the team. `a` must hold x quantized for m->kind
   (split order for int4). Ends with the loop's barrier. */
static void matvec(const Mat *m, Act a, float *y, int accumulate) {
    int64_t n = m->n;
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float v = row_dot(m, r, &a);
        if (m->bias) v += m->bias[r];
        y[r] = accumulate ? y[r] + v : v;
    }
}

/* ------------------------------------------------------------------------------------------- small ops
   One row each; the decode step calls them for its single token, the prompt row ops (end of file) per row. */

/* out = x / sqrt(mean(x^2) + eps) * w, n values; w float32 */
static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    __m256 ss = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float s = hsum8(ss);
    for (; i < n; i++) s += x[i] * x[i];
    const float r = 1.0f / sqrtf(s / n + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
    for (; i < n; i++) out[i] = x[i] * r * w[i];
}

/* In place, half-split RoPE on one head: out[i] = x[i] cos[i] - x[i+h] sin[i],
   out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h] */
static void rope(float *x, const float *cos, const float *sin, int hd) {
    const int h = hd / 2;
    int i = 0;
    for (; i + 8 <= h; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + h);
        __m256 lo = _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i), _mm256_mul_ps(a, _mm256_loadu_ps(cos + i)));
        __m256 hi = _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + i + h), _mm256_mul_ps(b, _mm256_loadu_ps(cos + i + h)));
        _mm256_storeu_ps(x + i, lo);
        _mm256_storeu_ps(x + i + h, hi);
    }
    for (; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* out[i] = silu(g[i]) * u[i], silu(g) = g / (1 + e^-g), e^-g clamped at e^88; n values (out may be g) */
static void silu_mul(const float *g, const float *u, int64_t n, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), top = _mm256_set1_ps(88.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), top));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ------------------------------------------------------------------------------------------- attention */
typedef struct {
    float m[MAX_HEADS], l[MAX_HEADS];
    float acc[MAX_HEADS * MAX_HD];
} Partial;

static inline __m256 load_i8x8(const int8_t *p) { /* 8 int8 -> 8 floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 16 int4 codes (8 bytes: channel 2j in the low nibble, 2j+1 in the high one) -> channels 0..7 in *lo, 8..15 in
   *hi, as floats 0..15 */
static inline void load_u4x16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(15);
    const __m128i x = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(x, x)));
}

static inline __m256 load_f16x8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

#define KV_GROUP 32 /* int4 keys: tokens per scale/zero (kv/quantized.py K_GROUP) */
#define MAX_VGROUPS (MAX_HD / 16) /* int4 value groups per row: at least 16 channels each */

/* One layer's rows in one format, as attend_rows reads them. Pointers at the layer's (Hkv, cap, ...) buffers:
   bf16 / int8 k, v (Hkv, cap, hd), int8's float32 scales ks, vs (Hkv, cap); int4 (kv/quantized.py Int4KVStore)
   packed k, v (Hkv, cap, hd/2), float16 key scale/zero ks, kz (Hkv, cap/KV_GROUP, hd) (per channel over a group
   of KV_GROUP slots), value scale/zero vs, vz (Hkv, cap, hd/vg) (per slot over vg channels). */
typedef struct {
    const void *k, *v, *ks, *vs, *kz, *vz;
    int64_t cap;
    int vg;
} Rows;

enum { ROWS_BF16 = 0, ROWS_INT8 = 1, ROWS_INT4 = 2 };

static void init_partial(const Model *M, Partial *P) {
    for (int h = 0; h < M->n_heads; h++) {
        P->m[h] = -INFINITY;
        P->l[h] = 0.0f;
        memset(P->acc + h * M->head_dim, 0, sizeof(float) * M->head_dim);
    }
}

/* Partial attention of all query heads over key slots [a, b) of R, added to P's running max m, sum l and sum of
   weighted values acc per head (q already scaled; P initialised by init_partial, so several ranges of different
   formats can go into one P). x = code * scale (int8), code * scale + zero (int4). The G query heads of a KV head
   are done together, so each key and value row is read and widened once. Compiled once per format (fmt
   constant). int4 keys: q . k = (q * s) . code + q . z over a key group, so q * s and q . z are made once per
   group and head; int4 values: sum_j p_j (s_j code_j + z_j) = sum_j (p_j s_j) code_j + sum_j p_j z_j, the zero
   sums once per block and value group. */
static inline __attribute__((always_inline)) void attend_rows(const Model *M, const float *q, const Rows *R,
                                                              int64_t a, int64_t b, Partial *P, const int fmt) {
    const int H = M->n_heads, Hkv = M->n_kv, hd = M->head_dim, G = H / Hkv, hb = hd / 2;
    const int64_t cap = R->cap;
    const int vg = fmt == ROWS_INT4 ? R->vg : hd, nvg = hd / vg;
    float sc[MAX_GROUP][ABLK] __attribute__((aligned(32)));
    float corr[MAX_GROUP];
    float qs[MAX_GROUP][MAX_HD] __attribute__((aligned(32))); /* int4: q * key scale, per query head */
    float qz[MAX_GROUP], zsum[MAX_GROUP][MAX_VGROUPS];
    float vsf[ABLK * MAX_VGROUPS + 8], vzf[ABLK * MAX_VGROUPS + 8]; /* int4 value scales / zeros of a block */
    float pw[MAX_VGROUPS][MAX_GROUP][ABLK];                           /* int4: weight x value scale */
    for (int kh = 0; kh < Hkv; kh++) {
        const int64_t row0 = (int64_t)kh * cap; /* this KV head's first row */
        const uint16_t *K = (const uint16_t *)R->k + row0 * hd, *V = (const uint16_t *)R->v + row0 * hd;
        const int8_t *K8 = (const int8_t *)R->k + row0 * hd, *V8 = (const int8_t *)R->v + row0 * hd;
        const uint8_t *K4 = (const uint8_t *)R->k + row0 * hb, *V4 = (const uint8_t *)R->v + row0 * hb;
        const float *KS = fmt == ROWS_INT8 ? (const float *)R->ks + row0 : NULL;
        const float *VS = fmt == ROWS_INT8 ? (const float *)R->vs + row0 : NULL;
        const uint16_t *KS4 = (const uint16_t *)R->ks + (int64_t)kh * (cap / KV_GROUP) * hd;
        const uint16_t *KZ4 = (const uint16_t *)R->kz + (int64_t)kh * (cap / KV_GROUP) * hd;
        const uint16_t *VS4 = (const uint16_t *)R->vs + row0 * nvg, *VZ4 = (const uint16_t *)R->vz + row0 * nvg;
        const float *qk = q + kh * G * hd;
        int64_t kgroup = -1; /* int4: the key group qs / qz were made for */
        for (int64_t t0 = a; t0 < b; t0 += ABLK) {
            const int nb = (int)(b - t0 < ABLK ? b - t0 : ABLK);
            for (int j = 0; j < nb; j++) { /* scores of the block */
                const int64_t t = t0 + j;
                __m256 s[MAX_GROUP];
                for (int g = 0; g < G; g++) s[g] = _mm256_setzero_ps();
                if (fmt == ROWS_INT4) {
                    if (t / KV_GROUP != kgroup) { /* q * scale and q . zero for this key group */
                        kgroup = t / KV_GROUP;
                        const uint16_t *gs = KS4 + kgroup * hd, *gz = KZ4 + kgroup * hd;
                        for (int g = 0; g < G; g++) {
                            __m256 z = _mm256_setzero_ps();
                            for (int i = 0; i < hd; i += 8) {
                                __m256 qv = _mm256_loadu_ps(qk + g * hd + i);
                                _mm256_store_ps(qs[g] + i, _mm256_mul_ps(qv, load_f16x8(gs + i)));
                                z = _mm256_fmadd_ps(qv, load_f16x8(gz + i), z);
                            }
                            qz[g] = hsum8(z);
                        }
                    }
                    for (int i = 0; i < hd; i += 16) {
                        __m256 k0, k1;
                        load_u4x16(K4 + t * hb + i / 2, &k0, &k1);
                        for (int g = 0; g < G; g++) {
                            s[g] = _mm256_fmadd_ps(k0, _mm256_load_ps(qs[g] + i), s[g]);
                            s[g] = _mm256_fmadd_ps(k1, _mm256_load_ps(qs[g] + i + 8), s[g]);
                        }
                    }
                    for (int g = 0; g < G; g++) sc[g][j] = hsum8(s[g]) + qz[g];
                    continue;
                }
                for (int i = 0; i < hd; i += 8) {
                    __m256 kv = fmt == ROWS_INT8 ? load_i8x8(K8 + t * hd + i) : load_bf16x8(K + t * hd + i);
                    for (int g = 0; g < G; g++) s[g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qk + g * hd + i), s[g]);
                }
                const float kscale = fmt == ROWS_INT8 ? KS[t] : 1.0f;
                for (int g = 0; g < G; g++) sc[g][j] = hsum8(s[g]) * kscale;
            }
            if (fmt == ROWS_INT4) /* the block's value scales and zeros (nb x nvg, contiguous) to float32 */
                for (int u = 0; u < nb * nvg; u += 8) {
                    const int64_t o = t0 * nvg + u;
                    if (u + 8 <= nb * nvg) {
                        _mm256_storeu_ps(vsf + u, load_f16x8(VS4 + o));
                        _mm256_storeu_ps(vzf + u, load_f16x8(VZ4 + o));
                    } else
                        for (int w = u; w < nb * nvg; w++) {
                            vsf[w] = _cvtsh_ss(VS4[t0 * nvg + w]);
                            vzf[w] = _cvtsh_ss(VZ4[t0 * nvg + w]);
                        }
                }
            for (int g = 0; g < G; g++) { /* online softmax update */
                const int h = kh * G + g;
                float bmax = -INFINITY;
                for (int j = 0; j < nb; j++) bmax = sc[g][j] > bmax ? sc[g][j] : bmax;
                const float mnew = bmax > P->m[h] ? bmax : P->m[h];
                corr[g] = P->m[h] == -INFINITY ? 0.0f : expf(P->m[h] - mnew);
                P->m[h] = mnew;
                int j = 0;
                __m256 ls = _mm256_setzero_ps();
                for (; j + 8 <= nb; j += 8) {
                    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc[g] + j), _mm256_set1_ps(mnew)));
                    _mm256_storeu_ps(sc[g] + j, p);
                    ls = _mm256_add_ps(ls, p);
                }
                float lsum = hsum8(ls);
                for (; j < nb; j++) {
                    sc[g][j] = expf(sc[g][j] - mnew);
                    lsum += sc[g][j];
                }
                P->l[h] = P->l[h] * corr[g] + lsum;
                if (fmt == ROWS_INT8)
                    for (j = 0; j < nb; j++) sc[g][j] *= VS[t0 + j]; /* the value rows' scales, once per weight */
                if (fmt == ROWS_INT4)
                    for (int c = 0; c < nvg; c++) { /* sum_j p_j z_j per value group, and p_j s_j */
                        float zs = 0.0f;
                        for (j = 0; j < nb; j++) {
                            zs += sc[g][j] * vzf[j * nvg + c];
                            pw[c][g][j] = sc[g][j] * vsf[j * nvg + c];
                        }
                        zsum[g][c] = zs;
                    }
            }
            if (fmt == ROWS_INT4) { /* weighted values, 16 dims (within one value group) at a time */
                for (int i = 0; i < hd; i += 16) {
                    __m256 o[MAX_GROUP], o2[MAX_GROUP];
                    const int c = i / vg;
                    for (int g = 0; g < G; g++) {
                        float *acc = P->acc + (kh * G + g) * hd + i;
                        const __m256 cg = _mm256_set1_ps(corr[g]), zg = _mm256_set1_ps(zsum[g][c]);
                        o[g] = _mm256_fmadd_ps(_mm256_loadu_ps(acc), cg, zg);
                        o2[g] = _mm256_fmadd_ps(_mm256_loadu_ps(acc + 8), cg, zg);
                    }
                    for (int j = 0; j < nb; j++) {
                        __m256 v0, v1;
                        load_u4x16(V4 + (t0 + j) * hb + i / 2, &v0, &v1);
                        for (int g = 0; g < G; g++) {
                            const __m256 w = _mm256_broadcast_ss(&pw[c][g][j]);
                            o[g] = _mm256_fmadd_ps(w, v0, o[g]);
                            o2[g] = _mm256_fmadd_ps(w, v1, o2[g]);
                        }
                    }
                    for (int g = 0; g < G; g++) {
                        _mm256_storeu_ps(P->acc + (kh * G + g) * hd + i, o[g]);
                        _mm256_storeu_ps(P->acc + (kh * G + g) * hd + i + 8, o2[g]);
                    }
                }
                continue;
            }
            for (int i = 0; i < hd; i += 8) { /* weighted values, 8 dims at a time */
                __m256 o[MAX_GROUP];
                for (int g = 0; g < G; g++)
                    o[g] = _mm256_mul_ps(_mm256_loadu_ps(P->acc + (kh * G + g) * hd + i), _mm256_set1_ps(corr[g]));
                for (int j = 0; j < nb; j++) {
                    const int64_t t = t0 + j;
                    __m256 vv = fmt == ROWS_INT8 ? load_i8x8(V8 + t * hd + i) : load_bf16x8(V + t * hd + i);
                    for (int g = 0; g < G; g++) o[g] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g][j]), vv, o[g]);
                }
                for (int g = 0; g < G; g++) _mm256_storeu_ps(P->acc + (kh * G + g) * hd + i, o[g]);
            }
        }
    }
}

/* int4 rows with AVX-512 (attend_rows' ROWS_INT4 arithmetic, reassociated; kv512 says where it runs): the same
   blocks of ABLK slots, online softmax and merged P, with fewer instructions per slot.
   Keys, 16 slots in the lanes: a key group's 32 packed rows are transposed (3 levels of two-source dword
   permutes) so that dword d of 16 slots sits in one register; its nibble k is channel 8d + k, turned into the
   float code by a permute from the 16-entry table 0..15 (vpermps reads only an index's low 4 bits, so a shift
   is the whole unpacking) and multiplied by (q * scale)[8d + k] broadcast, for every query head of the group:
   the scores of 16 slots come out in one register, no horizontal sums. Values, channels in the lanes: 16 packed
   bytes (32 channels, within one value group) widened to dwords give the even channels through the table and
   the odd ones after a shift by 4, each times p_j s_j broadcast per query head; the accumulators of such a
   chunk hold (even | odd) channels and are permuted back at the block's end. Softmax, p_j s_j and the zero
   sums sum_j p_j z_j in registers of 16 slots. Needs a, b multiples of KV_GROUP, head_dim 32 or a multiple of
   64 and value groups of a multiple of 32 channels (else attend_rows runs). */
#define KV_GH 8 /* query heads per pass over a block's codes (registers: 2 x KV_GH accumulators) */

static int kv512_force = -1; /* ic_kv_avx512: -1 the CPU decides, 0 never (attend_rows' AVX2 int4 / int8 / bf16) */

static int kv512(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
    return v && kv512_force != 0;
}

/* mode -1: int4, int8 and bf16 KV attention with AVX-512 where the CPU has it (the default); 0: never (the AVX2
   code every CPU runs; tests compare both). Returns whether it is used now. */
int ic_kv_avx512(int mode) {
    kv512_force = mode < 0 ? -1 : mode > 0 ? 1 : 0;
    return kv512();
}

/* 16 slots x 8 dwords -> out[d] (16,) dword d of each slot. r[i]: slots 2i, 2i+1 (lanes 8s + d: slot 2i+s) */
/* fn(args..., GH) for gh query heads per pass, GH a constant 1..8 (KV_GH) in each case, so that the compiler
   specialises fn's loops over the heads for each count */
#define BY_GH(gh, fn, ...)                                                                                           \
    switch (gh) {                                                                                                    \
    case 1: fn(__VA_ARGS__, 1); break;                                                                               \
    case 2: fn(__VA_ARGS__, 2); break;                                                                               \
    case 3: fn(__VA_ARGS__, 3); break;                                                                               \
    case 4: fn(__VA_ARGS__, 4); break;                                                                               \
    case 5: fn(__VA_ARGS__, 5); break;                                                                               \
    case 6: fn(__VA_ARGS__, 6); break;                                                                               \
    case 7: fn(__VA_ARGS__, 7); break;                                                                               \
    default: fn(__VA_ARGS__, 8); break;                                                                              \
    }

/* The online softmax after a block of scores s (nv x 16): the running max m becomes max(m, the block's) (returned);
   corr <- the factor that rescales what was accumulated under the old max (0 before any) */
AVX512 static inline float block_max(const float *s, int nv, float *m, float *corr) {
    __m512 mx = _mm512_load_ps(s);
    for (int u = 1; u < nv; u++) mx = _mm512_max_ps(mx, _mm512_load_ps(s + 16 * u));
    const float bmax = _mm512_reduce_max_ps(mx);
    const float mnew = bmax > *m ? bmax : *m;
    *corr = *m == -INFINITY ? 0.0f : expf(*m - mnew);
    *m = mnew;
    return mnew;
}

AVX512 static inline __attribute__((always_inline)) void transpose16x8(const __m512i r[8], __m512i out[8]) {
    /* level 1, slots 4m + u (u < 4) from r[2m], r[2m+1]: lane 4d + u <- 8u + d (dwords 0..3), 8u + d + 4 (4..7) */
    const __m512i i1 = _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
    const __m512i i1h = _mm512_add_epi32(i1, _mm512_set1_epi32(4));
    /* level 2, slots 8p + v from two level-1 registers: lane 8d + v <- 16 (v / 4) + 4d + v % 4, d in {0, 1} or
       {2, 3} (+8) */
    const __m512i i2 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i i2h = _mm512_add_epi32(i2, _mm512_set1_epi32(8));
    /* level 3, 16 slots from two level-2 registers: lane w <- 16 (w / 8) + w % 8 (+8: the pair's second dword) */
    const __m512i i3 = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i i3h = _mm512_add_epi32(i3, _mm512_set1_epi32(8));
    __m512i l1[8], l2[8];
    for (int m = 0; m < 4; m++) { /* l1[2m]: slots 4m.., dwords 0..3; l1[2m+1]: dwords 4..7 */
        l1[2 * m] = _mm512_permutex2var_epi32(r[2 * m], i1, r[2 * m + 1]);
        l1[2 * m + 1] = _mm512_permutex2var_epi32(r[2 * m], i1h, r[2 * m + 1]);
    }
    for (int p = 0; p < 2; p++)     /* slots 8p.. */
        for (int h = 0; h < 2; h++) { /* l2[4p + 2h + e]: dwords 4h + 2e, 4h + 2e + 1 */
            l2[4 * p + 2 * h] = _mm512_permutex2var_epi32(l1[4 * p + h], i2, l1[4 * p + 2 + h]);
            l2[4 * p + 2 * h + 1] = _mm512_permutex2var_epi32(l1[4 * p + h], i2h, l1[4 * p + 2 + h]);
        }
    for (int e = 0; e < 4; e++) { /* dwords 2e, 2e + 1 of slots 0..7 (l2[e]) and 8..15 (l2[4 + e]) */
        out[2 * e] = _mm512_permutex2var_epi32(l2[e], i3, l2[4 + e]);
        out[2 * e + 1] = _mm512_permutex2var_epi32(l2[e], i3h, l2[4 + e]);
    }
}

/* 16 slots x 4 dwords -> out[d] (16,). r[i]: slots 4i..4i+3 (lane 4s + d) */
AVX512 static inline __attribute__((always_inline)) void transpose16x4(const __m512i r[4], __m512i out[4]) {
    /* level 1, slots 8m + v from r[2m], r[2m+1]: lane 8d + v <- 4v + d, d in {0, 1} or {2, 3} (+2) */
    const __m512i i1 = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i i1h = _mm512_add_epi32(i1, _mm512_set1_epi32(2));
    const __m512i i3 = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i i3h = _mm512_add_epi32(i3, _mm512_set1_epi32(8));
    __m512i l1[4];
    for (int m = 0; m < 2; m++) {
        l1[2 * m] = _mm512_permutex2var_epi32(r[2 * m], i1, r[2 * m + 1]);
        l1[2 * m + 1] = _mm512_permutex2var_epi32(r[2 * m], i1h, r[2 * m + 1]);
    }
    for (int e = 0; e < 2; e++) {
        out[2 * e] = _mm512_permutex2var_epi32(l1[e], i3, l1[2 + e]);
        out[2 * e + 1] = _mm512_permutex2var_epi32(l1[e], i3h, l1[2 + e]);
    }
}

/* A key group's 32 packed rows K4 (32, hd/2) -> kt (hd/8, 32): dword d of slot s at kt[d * 32 + s] */
AVX512 static inline __attribute__((always_inline)) void transpose_group(const uint8_t *K4, int hd, uint32_t *kt) {
    const int hb = hd / 2;
    for (int h = 0; h < 2; h++) { /* slots 16h.. */
        const uint8_t *k = K4 + (int64_t)16 * h * hb;
        if (hd == 32) { /* rows of 16 bytes: 4 slots per register */
            __m512i r[4], o[4];
            for (int i = 0; i < 4; i++) r[i] = _mm512_loadu_si512((const void *)(k + 64 * i));
            transpose16x4(r, o);
            for (int d = 0; d < 4; d++) _mm512_store_si512((void *)(kt + d * 32 + 16 * h), o[d]);
            continue;
        }
        for (int c = 0; c < hb; c += 32) { /* dwords c/4 .. c/4 + 7 */
            __m512i r[8], o[8];
            for (int i = 0; i < 8; i++) {
                const __m256i s0 = _mm256_loadu_si256((const __m256i *)(k + 2 * i * hb + c));
                const __m256i s1 = _mm256_loadu_si256((const __m256i *)(k + (2 * i + 1) * hb + c));
                r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(s0), s1, 1);
            }
            transpose16x8(r, o);
            for (int d = 0; d < 8; d++) _mm512_store_si512((void *)(kt + (c / 4 + d) * 32 + 16 * h), o[d]);
        }
    }
}

/* scores of a key group's 32 slots for GH query heads: sc[g][j0 + s] = (q * scale)[g] . codes[s] + qz[g] */
AVX512 static inline __attribute__((always_inline)) void int4_scores(const uint32_t *kt, int hd, const float *qs,
                                                                     const float *qz, float (*sc)[ABLK], int j0,
                                                                     const int GH) {
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 s0[KV_GH], s1[KV_GH];
    for (int g = 0; g < GH; g++) s0[g] = s1[g] = _mm512_setzero_ps();
    for (int d = 0; d < hd / 8; d++) {
        const __m512i x0 = _mm512_load_si512((const void *)(kt + d * 32));
        const __m512i x1 = _mm512_load_si512((const void *)(kt + d * 32 + 16));
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            const __m512 c0 = _mm512_permutexvar_ps(_mm512_srli_epi32(x0, 4 * k), lut);
            const __m512 c1 = _mm512_permutexvar_ps(_mm512_srli_epi32(x1, 4 * k), lut);
            for (int g = 0; g < GH; g++) {
                const __m512 w = _mm512_set1_ps(qs[g * MAX_HD + 8 * d + k]);
                s0[g] = _mm512_fmadd_ps(c0, w, s0[g]);
                s1[g] = _mm512_fmadd_ps(c1, w, s1[g]);
            }
        }
    }
    for (int g = 0; g < GH; g++) {
        const __m512 z = _mm512_set1_ps(qz[g]);
        _mm512_store_ps(sc[g] + j0, _mm512_add_ps(s0[g], z));
        _mm512_store_ps(sc[g] + j0 + 16, _mm512_add_ps(s1[g], z));
    }
}

/* acc[g] (hd,) of GH query heads = acc * corr + zsum + sum_j pw[g][j] codes_j over channels [i, i + 32) of the
   block's nb value rows V4 (nb, hd/2); pw, zsum: this chunk's value group */
AVX512 static inline __attribute__((always_inline)) void int4_values(const uint8_t *V4, int hb, int nb, int i,
                                                                     float *const acc[], const float *corr,
                                                                     const float *zsum, const float (*pw)[ABLK],
                                                                     const int GH) {
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    __m512 oe[KV_GH], oo[KV_GH]; /* channels i + 2l, i + 2l + 1 */
    for (int g = 0; g < GH; g++) {
        const __m512 a0 = _mm512_loadu_ps(acc[g] + i), a1 = _mm512_loadu_ps(acc[g] + i + 16);
        const __m512 cg = _mm512_set1_ps(corr[g]), zg = _mm512_set1_ps(zsum[g]);
        oe[g] = _mm512_fmadd_ps(_mm512_permutex2var_ps(a0, ev, a1), cg, zg);
        oo[g] = _mm512_fmadd_ps(_mm512_permutex2var_ps(a0, od, a1), cg, zg);
    }
    const uint8_t *v = V4 + i / 2;
    for (int j = 0; j < nb; j++) {
        const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(v + (int64_t)j * hb)));
        const __m512 ce = _mm512_permutexvar_ps(x, lut), co = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), lut);
        for (int g = 0; g < GH; g++) {
            const __m512 w = _mm512_set1_ps(pw[g][j]);
            oe[g] = _mm512_fmadd_ps(w, ce, oe[g]);
            oo[g] = _mm512_fmadd_ps(w, co, oo[g]);
        }
    }
    /* back to channel order: lane 2l <- even l, 2l + 1 <- odd l */
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    for (int g = 0; g < GH; g++) {
        _mm512_storeu_ps(acc[g] + i, _mm512_permutex2var_ps(oe[g], lo, oo[g]));
        _mm512_storeu_ps(acc[g] + i + 16, _mm512_permutex2var_ps(oe[g], hi, oo[g]));
    }
}

/* nb (a multiple of 16) slots' float16 value scales (or zeros) x (nb, nvg) -> out[c][j] float32, per value group */
AVX512 static inline void value_scales(const uint16_t *x, int nb, int nvg, float (*out)[ABLK]) {
    if (nvg == 1)
        for (int j = 0; j < nb; j += 16)
            _mm512_store_ps(out[0] + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + j))));
    else if (nvg == 2) { /* 16 slots' (group 0, group 1) pairs -> group 0's and group 1's */
        const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
        for (int j = 0; j < nb; j += 16) {
            const __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + 2 * j)));
            const __m512 b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + 2 * j + 16)));
            _mm512_store_ps(out[0] + j, _mm512_permutex2var_ps(a, ev, b));
            _mm512_store_ps(out[1] + j, _mm512_permutex2var_ps(a, od, b));
        }
    } else
        for (int j = 0; j < nb; j++)
            for (int c = 0; c < nvg; c++) out[c][j] = _cvtsh_ss(x[j * nvg + c]);
}

AVX512 static void attend_int4_512(const Model *M, const float *q, const Rows *R, int64_t a, int64_t b, Partial *P) {
    const int H = M->n_heads, Hkv = M->n_kv, hd = M->head_dim, G = H / Hkv, hb = hd / 2;
    const int64_t cap = R->cap;
    const int vg = R->vg, nvg = hd / vg;
    float sc[MAX_GROUP][ABLK] __attribute__((aligned(64)));
    float qs[MAX_GROUP * MAX_HD] __attribute__((aligned(64))); /* q * key scale, per query head */
    uint32_t kt[MAX_HD / 8 * KV_GROUP] __attribute__((aligned(64)));
    float qz[MAX_GROUP], corr[MAX_GROUP], zsum[MAX_HD / 32][MAX_GROUP];
    float vsf[MAX_HD / 32][ABLK] __attribute__((aligned(64))), vzf[MAX_HD / 32][ABLK] __attribute__((aligned(64)));
    float pw[MAX_HD / 32][MAX_GROUP][ABLK] __attribute__((aligned(64))); /* weight x value scale */
    for (int kh = 0; kh < Hkv; kh++) {
        const int64_t row0 = (int64_t)kh * cap;
        const uint8_t *K4 = (const uint8_t *)R->k + row0 * hb, *V4 = (const uint8_t *)R->v + row0 * hb;
        const uint16_t *KS4 = (const uint16_t *)R->ks + (int64_t)kh * (cap / KV_GROUP) * hd;
        const uint16_t *KZ4 = (const uint16_t *)R->kz + (int64_t)kh * (cap / KV_GROUP) * hd;
        const uint16_t *VS4 = (const uint16_t *)R->vs + row0 * nvg, *VZ4 = (const uint16_t *)R->vz + row0 * nvg;
        const float *qk = q + kh * G * hd;
        float *accp[MAX_GROUP];
        for (int g = 0; g < G; g++) accp[g] = P->acc + (kh * G + g) * hd;
        for (int64_t t0 = a; t0 < b; t0 += ABLK) {
            const int nb = (int)(b - t0 < ABLK ? b - t0 : ABLK); /* 32 or 64 */
            for (int j0 = 0; j0 < nb; j0 += KV_GROUP) { /* scores, one key group at a time */
                const int64_t kg = (t0 + j0) / KV_GROUP;
                const uint16_t *gs = KS4 + kg * hd, *gz = KZ4 + kg * hd;
                __m512 zq[MAX_GROUP]; /* q * scale and q . zero for this key group, its scales widened once */
                for (int g = 0; g < G; g++) zq[g] = _mm512_setzero_ps();
                for (int i = 0; i < hd; i += 16) {
                    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gs + i)));
                    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gz + i)));
                    for (int g = 0; g < G; g++) {
                        const __m512 qv = _mm512_loadu_ps(qk + g * hd + i);
                        _mm512_store_ps(qs + g * MAX_HD + i, _mm512_mul_ps(qv, s));
                        zq[g] = _mm512_fmadd_ps(qv, z, zq[g]);
                    }
                }
                for (int g = 0; g < G; g++) qz[g] = _mm512_reduce_add_ps(zq[g]);
                transpose_group(K4 + (t0 + j0) * hb, hd, kt);
                for (int g0 = 0; g0 < G; g0 += KV_GH) {
                    const int gh = G - g0 < KV_GH ? G - g0 : KV_GH;
                    const float *qsg = qs + g0 * MAX_HD;
                    BY_GH(gh, int4_scores, kt, hd, qsg, qz + g0, sc + g0, j0);
                }
            }
            value_scales(VS4 + t0 * nvg, nb, nvg, vsf); /* the block's value scales and zeros, per value group */
            value_scales(VZ4 + t0 * nvg, nb, nvg, vzf);
            const int nv = nb / 16;
            for (int g = 0; g < G; g++) { /* online softmax update; p_j s_j and sum_j p_j z_j */
                const int h = kh * G + g;
                const float mnew = block_max(sc[g], nv, &P->m[h], &corr[g]);
                __m512 ls = _mm512_setzero_ps(), zs[MAX_HD / 32];
                for (int c = 0; c < nvg; c++) zs[c] = _mm512_setzero_ps();
                for (int u = 0; u < nv; u++) {
                    const __m512 p = exp16(_mm512_sub_ps(_mm512_load_ps(sc[g] + 16 * u), _mm512_set1_ps(mnew)));
                    ls = _mm512_add_ps(ls, p);
                    for (int c = 0; c < nvg; c++) {
                        zs[c] = _mm512_fmadd_ps(p, _mm512_load_ps(vzf[c] + 16 * u), zs[c]);
                        _mm512_store_ps(pw[c][g] + 16 * u, _mm512_mul_ps(p, _mm512_load_ps(vsf[c] + 16 * u)));
                    }
                }
                P->l[h] = P->l[h] * corr[g] + _mm512_reduce_add_ps(ls);
                for (int c = 0; c < nvg; c++) zsum[c][g] = _mm512_reduce_add_ps(zs[c]);
            }
            const uint8_t *Vb = V4 + t0 * hb;
            for (int i = 0; i < hd; i += 32) { /* weighted values, 32 channels (one value group) at a time */
                const int c = i / vg;
                for (int g0 = 0; g0 < G; g0 += KV_GH) {
                    const int gh = G - g0 < KV_GH ? G - g0 : KV_GH;
                    float *const *ap = accp + g0;
                    const float *cr = corr + g0, *zz = zsum[c] + g0;
                    const float(*pp)[ABLK] = (const float(*)[ABLK])pw[c][g0];
                    BY_GH(gh, int4_values, Vb, hb, nb, i, ap, cr, zz, pp);
                }
            }
        }
    }
}

/* int8 rows with AVX-512 (attend_rows' ROWS_INT8 arithmetic, reassociated; kv512 says where it runs): the same
   blocks of ABLK slots, online softmax and merged P. Keys, 16 slots in the lanes: 16 rows are transposed 32
   bytes at a time (transpose16x8) so that dword d of 16 slots (channels 4d..4d+3) sits in one register; a byte
   shuffle puts channel 4d + k in the top byte of each lane (the rest zero), converted exactly to code * 2^24 and
   multiplied by (q * 2^-24)[4d + k] broadcast, for every query head of the group: the scores of 16 slots come
   out in one register (times the slots' key scales), no horizontal sums. Values, channels in the lanes: 32 codes
   of a row widened (vpmovsxbd) once for all query heads, times p_j * value scale_j broadcast. Slots past b are
   zero rows with score -inf (weight 0). Needs head_dim a multiple of 32 (else attend_rows runs). */
AVX512 static inline __attribute__((always_inline)) void int8_scores(const uint32_t *kt, int hd, const float *qs,
                                                                     __m512 *out, const int GH) {
    __m512i sh[4]; /* channel 4d + k of each lane's dword into its top byte */
    for (int k = 0; k < 4; k++)
        sh[k] = _mm512_add_epi32(_mm512_set4_epi32(0x0c808080, 0x08808080, 0x04808080, 0x00808080),
                                 _mm512_set1_epi32(k << 24));
    __m512 s[KV_GH];
    for (int g = 0; g < GH; g++) s[g] = _mm512_setzero_ps();
    for (int d = 0; d < hd / 4; d++) {
        const __m512i x = _mm512_load_si512((const void *)(kt + d * 16));
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const __m512 c = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(x, sh[k]));
            for (int g = 0; g < GH; g++) s[g] = _mm512_fmadd_ps(c, _mm512_set1_ps(qs[g * MAX_HD + 4 * d + k]), s[g]);
        }
    }
    for (int g = 0; g < GH; g++) out[g] = s[g];
}

/* 16 int8 codes at p -> 16 floats (exact) */
AVX512 static inline __m512 load_i8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* 16 bf16 at p -> 16 floats (exact) */
AVX512 static inline __m512 load_bf16x16(const uint16_t *p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* acc[g] (hd,) of GH query heads = acc * corr + sum_j pw[g][j] row_j over channels [i, i + 32) of the block's nb
   value rows V (nb, hd): int8 codes (bf16 = 0: pw carries the rows' scales) or bf16 values (bf16 = 1); `bf16` is a
   constant where this is inlined, so each caller gets the loop of its own format */
AVX512 static inline __attribute__((always_inline)) void row_values(const void *V, int bf16, int hd, int nb, int i,
                                                                    float *const acc[], const float *corr,
                                                                    const float (*pw)[ABLK], const int GH) {
    __m512 o0[KV_GH], o1[KV_GH];
    for (int g = 0; g < GH; g++) {
        const __m512 cg = _mm512_set1_ps(corr[g]);
        o0[g] = _mm512_mul_ps(_mm512_loadu_ps(acc[g] + i), cg);
        o1[g] = _mm512_mul_ps(_mm512_loadu_ps(acc[g] + i + 16), cg);
    }
    for (int j = 0; j < nb; j++) {
        const int64_t at = (int64_t)j * hd + i;
        const __m512 x0 = bf16 ? load_bf16x16((const uint16_t *)V + at) : load_i8x16((const int8_t *)V + at);
        const __m512 x1 = bf16 ? load_bf16x16((const uint16_t *)V + at + 16) : load_i8x16((const int8_t *)V + at + 16);
        for (int g = 0; g < GH; g++) {
            const __m512 w = _mm512_set1_ps(pw[g][j]);
            o0[g] = _mm512_fmadd_ps(w, x0, o0[g]);
            o1[g] = _mm512_fmadd_ps(w, x1, o1[g]);
        }
    }
    for (int g = 0; g < GH; g++) {
        _mm512_storeu_ps(acc[g] + i, o0[g]);
        _mm512_storeu_ps(acc[g] + i + 16, o1[g]);
    }
}

/* n (<= 16) rows K8 (n, hd) int8 -> kt (hd/4, 16): dword d of slot s at kt[d * 16 + s]; rows n.. zero */
AVX512 static inline __attribute__((always_inline)) void transpose_rows8(const int8_t *K8, int hd, int n,
                                                                         uint32_t *kt) {
    for (int c = 0; c < hd; c += 32) { /* dwords c/4 .. c/4 + 7 */
        __m512i r[8], o[8];
        for (int i = 0; i < 8; i++) {
            const __m256i z = _mm256_setzero_si256();
            const __m256i s0 = 2 * i < n ? _mm256_loadu_si256((const __m256i *)(K8 + 2 * i * hd + c)) : z;
            const __m256i s1 = 2 * i + 1 < n ? _mm256_loadu_si256((const __m256i *)(K8 + (2 * i + 1) * hd + c)) : z;
            r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(s0), s1, 1);
        }
        transpose16x8(r, o);
        for (int d = 0; d < 8; d++) _mm512_store_si512((void *)(kt + (c / 4 + d) * 16), o[d]);
    }
}

AVX512 static void attend_int8_512(const Model *M, const float *q, const Rows *R, int64_t a, int64_t b, Partial *P) {
    const int H = M->n_heads, Hkv = M->n_kv, hd = M->head_dim, G = H / Hkv;
    const int64_t cap = R->cap;
    float sc[MAX_GROUP][ABLK] __attribute__((aligned(64)));
    float qs[MAX_GROUP * MAX_HD] __attribute__((aligned(64))); /* q * 2^-24, per query head */
    uint32_t kt[MAX_HD / 4 * 16] __attribute__((aligned(64)));
    float corr[MAX_GROUP];
    float pw[MAX_GROUP][ABLK] __attribute__((aligned(64))); /* weight x value scale */
    for (int kh = 0; kh < Hkv; kh++) {
        const int64_t row0 = (int64_t)kh * cap;
        const int8_t *K8 = (const int8_t *)R->k + row0 * hd, *V8 = (const int8_t *)R->v + row0 * hd;
        const float *KS = (const float *)R->ks + row0, *VS = (const float *)R->vs + row0;
        const float *qk = q + kh * G * hd;
        float *accp[MAX_GROUP];
        for (int g = 0; g < G; g++) {
            accp[g] = P->acc + (kh * G + g) * hd;
            for (int i = 0; i < hd; i += 16) /* exact: a power of 2 (the codes come times 2^24) */
                _mm512_store_ps(qs + g * MAX_HD + i, _mm512_mul_ps(_mm512_loadu_ps(qk + g * hd + i),
                                                                   _mm512_set1_ps(1.0f / 16777216.0f)));
        }
        for (int64_t t0 = a; t0 < b; t0 += ABLK) {
            const int nb = (int)(b - t0 < ABLK ? b - t0 : ABLK), nv = (nb + 15) / 16;
            for (int u = 0; u < nv; u++) { /* scores, 16 slots at a time */
                const int n = nb - 16 * u < 16 ? nb - 16 * u : 16;
                const __mmask16 live = (__mmask16)((1u << n) - 1);
                const int64_t t = t0 + 16 * u;
                transpose_rows8(K8 + t * hd, hd, n, kt);
                const __m512 ksc = _mm512_maskz_loadu_ps(live, KS + t), ninf = _mm512_set1_ps(-INFINITY);
                for (int g0 = 0; g0 < G; g0 += KV_GH) {
                    const int gh = G - g0 < KV_GH ? G - g0 : KV_GH;
                    const float *qsg = qs + g0 * MAX_HD;
                    __m512 s[KV_GH];
                    BY_GH(gh, int8_scores, kt, hd, qsg, s);
                    for (int g = 0; g < gh; g++)
                        _mm512_store_ps(sc[g0 + g] + 16 * u, _mm512_mask_mul_ps(ninf, live, s[g], ksc));
                }
            }
            for (int g = 0; g < G; g++) { /* online softmax update; p_j times the value row's scale */
                const int h = kh * G + g;
                const float mnew = block_max(sc[g], nv, &P->m[h], &corr[g]);
                __m512 ls = _mm512_setzero_ps();
                for (int u = 0; u < nv; u++) {
                    const int n = nb - 16 * u < 16 ? nb - 16 * u : 16;
                    const __mmask16 live = (__mmask16)((1u << n) - 1);
                    const __m512 p = exp16(_mm512_sub_ps(_mm512_load_ps(sc[g] + 16 * u), _mm512_set1_ps(mnew)));
                    ls = _mm512_add_ps(ls, p);
                    _mm512_store_ps(pw[g] + 16 * u, _mm512_mul_ps(p, _mm512_maskz_loadu_ps(live, VS + t0 + 16 * u)));
                }
                P->l[h] = P->l[h] * corr[g] + _mm512_reduce_add_ps(ls);
            }
            const int8_t *Vb = V8 + t0 * hd;
            for (int i = 0; i < hd; i += 32) /* weighted values, 32 channels at a time */
                for (int g0 = 0; g0 < G; g0 += KV_GH) {
                    const int gh = G - g0 < KV_GH ? G - g0 : KV_GH;
                    float *const *ap = accp + g0;
                    const float *cr = corr + g0;
                    const float(*pp)[ABLK] = (const float(*)[ABLK])pw[g0];
                    BY_GH(gh, row_values, Vb, 0, hd, nb, i, ap, cr, pp);
                }
        }
    }
}

/* bf16 rows with AVX-512 (attend_rows' ROWS_BF16 arithmetic, reassociated; kv512 says where it runs): the same
   blocks of ABLK slots, online softmax and merged P. bf16 -> float32 is exact (the 16 bits into a lane's top
   half). Keys, 16 slots in the lanes: 16 rows are transposed 32 bytes (16 channels) at a time (transpose_rows8
   over rows of 2 hd bytes) so that dword d of 16 slots (channels 2d, 2d + 1) sits in one register; a shift by
   16 gives channel 2d, a mask of the top half channel 2d + 1, each times q[c] broadcast for every query head of
   the group: the scores of 16 slots in one register, no horizontal sums. Values, channels in the lanes: 32
   channels of a row widened once for all query heads, times p_j broadcast. Slots past b are zero rows with
   score -inf (weight 0). Needs head_dim a multiple of 32 (else attend_rows runs). */
AVX512 static inline __attribute__((always_inline)) void bf16_scores(const uint32_t *kt, int hd, const float *qg,
                                                                     __m512 *out, const int GH) {
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    __m512 s[KV_GH];
    for (int g = 0; g < GH; g++) s[g] = _mm512_setzero_ps();
    for (int d = 0; d < hd / 2; d++) {
        const __m512i x = _mm512_load_si512((const void *)(kt + d * 16));
        const __m512 c0 = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); /* channel 2d */
        const __m512 c1 = _mm512_castsi512_ps(_mm512_and_si512(x, hi));   /* channel 2d + 1 */
        for (int g = 0; g < GH; g++) {
            s[g] = _mm512_fmadd_ps(c0, _mm512_set1_ps(qg[g * hd + 2 * d]), s[g]);
            s[g] = _mm512_fmadd_ps(c1, _mm512_set1_ps(qg[g * hd + 2 * d + 1]), s[g]);
        }
    }
    for (int g = 0; g < GH; g++) out[g] = s[g];
}

AVX512 static void attend_bf16_512(const Model *M, const float *q, const Rows *R, int64_t a, int64_t b, Partial *P) {
    const int H = M->n_heads, Hkv = M->n_kv, hd = M->head_dim, G = H / Hkv;
    const int64_t cap = R->cap;
    float sc[MAX_GROUP][ABLK] __attribute__((aligned(64)));
    uint32_t kt[MAX_HD / 2 * 16] __attribute__((aligned(64)));
    float corr[MAX_GROUP];
    for (int kh = 0; kh < Hkv; kh++) {
        const int64_t row0 = (int64_t)kh * cap;
        const uint16_t *K = (const uint16_t *)R->k + row0 * hd, *V = (const uint16_t *)R->v + row0 * hd;
        const float *qk = q + kh * G * hd;
        float *accp[MAX_GROUP];
        for (int g = 0; g < G; g++) accp[g] = P->acc + (kh * G + g) * hd;
        for (int64_t t0 = a; t0 < b; t0 += ABLK) {
            const int nb = (int)(b - t0 < ABLK ? b - t0 : ABLK), nv = (nb + 15) / 16;
            for (int u = 0; u < nv; u++) { /* scores, 16 slots at a time */
                const int n = nb - 16 * u < 16 ? nb - 16 * u : 16;
                const __mmask16 live = (__mmask16)((1u << n) - 1);
                const int64_t t = t0 + 16 * u;
                transpose_rows8((const int8_t *)(K + t * hd), 2 * hd, n, kt);
                const __m512 ninf = _mm512_set1_ps(-INFINITY);
                for (int g0 = 0; g0 < G; g0 += KV_GH) {
                    const int gh = G - g0 < KV_GH ? G - g0 : KV_GH;
                    const float *qg = qk + g0 * hd;
                    __m512 s[KV_GH];
                    BY_GH(gh, bf16_scores, kt, hd, qg, s);
                    for (int g = 0; g < gh; g++)
                        _mm512_store_ps(sc[g0 + g] + 16 * u, _mm512_mask_mov_ps(ninf, live, s[g]));
                }
            }
            for (int g = 0; g < G; g++) { /* online softmax update: sc becomes p */
                const int h = kh * G + g;
                const float mnew = block_max(sc[g], nv, &P->m[h], &corr[g]);
                __m512 ls = _mm512_setzero_ps();
                for (int u = 0; u < nv; u++) {
                    const __m512 p = exp16(_mm512_sub_ps(_mm512_load_ps(sc[g] + 16 * u), _mm512_set1_ps(mnew)));
                    ls = _mm512_add_ps(ls, p);
                    _mm512_store_ps(sc[g] + 16 * u, p);
                }
                P->l[h] = P->l[h] * corr[g] + _mm512_reduce_add_ps(ls);
            }
            const uint16_t *Vb = V + t0 * hd;
            for (int i = 0; i < hd; i += 32) /* weighted values, 32 channels at a time */
                for (int g0 = 0; g0 < G; g0 += KV_GH) {
                    const int gh = G - g0 < KV_GH ? G - g0 : KV_GH;
                    float *const *ap = accp + g0;
                    const float *cr = corr + g0;
                    const float(*pp)[ABLK] = (const float(*)[ABLK])sc[g0];
                    BY_GH(gh, row_values, Vb, 1, hd, nb, i, ap, cr, pp);
                }
        }
    }
}

/* ------------------------------------------------------------------------------------------- KV formats
   Where the step keeps a layer's key/value rows: the KV store's bf16 buffers, its int8 codes + scales
   (kv/quantized.py Int8KVStore), or its int4 KIVI groups (Int4KVStore) plus the bf16 residual of the newest
   slots. One KVView per call: per layer, pointers at the buffers (see Rows for their shapes). With KV_HADAMARD
   the quantized keys were stored multiplied by the orthonormal Hadamard matrix H (symmetric, H H = I): their
   scores take the query multiplied by H too, q H . k H = q . k (the int4 residual holds plain keys). */
enum { KV_BF16 = 0, KV_INT8 = 1, KV_INT4 = 2 };
#define KV_HADAMARD 1

typedef struct {
    int32_t format;                /* KV_* */
    int32_t flags;                 /* KV_HADAMARD or 0 */
    int64_t cap;                   /* slots per (layer, KV head) in k/v (int4: quantized slots allocated) */
    void *const *k, *const *v;     /* per layer: (Hkv, cap, hd) bf16 / int8; int4 (Hkv, cap, hd/2) packed */
    void *const *ks, *const *vs;   /* per layer: int8 float32 scales; int4 float16 scales (see Rows); else NULL */
    void *const *kz, *const *vz;   /* per layer: int4 float16 zeros, else NULL */
    void *const *rk, *const *rv;   /* per layer: int4's residual (Hkv, rcap, hd) bf16, slots [qlen, ...) */
    int64_t rcap;                  /* int4: residual rows per (layer, KV head) */
    int64_t qlen;                  /* int4: slots [0, qlen) quantized (a multiple of KV_GROUP) */
    int32_t vgroup;                /* int4: value channels per scale / zero */
} KVView;

/* In place: x (n,) times the orthonormal Hadamard matrix (Sylvester order, n a power of 2): butterflies of
   stride 1, 2, 4, ..., then 1/sqrt(n); the same operations in the same order as kv/quantized.py hadamard */
static void hadamard(float *x, int n) {
    for (int h = 1; h < n; h *= 2)
        for (int blk = 0; blk < n; blk += 2 * h)
            for (int j = blk; j < blk + h; j++) {
                const float u = x[j], w = x[j + h];
                x[j] = u + w;
                x[j + h] = u - w;
            }
    const float s = (float)(1.0 / sqrt((double)n));
    for (int i = 0; i < n; i++) x[i] *= s;
}

/* one row x (hd,) float32 -> int8 codes and a scale: 127 / max|x| as the multiplier, round half to even (what
   kv/quantized.py quantize_int8 computes) */
static void quantize_row_int8(const float *x, int hd, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (int i = 0; i < hd; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int i = 0; i < hd; i++) q[i] = (int8_t)rintf(x[i] * inv);
    *scale = amax / 127.0f;
}

static void bf16_row(const float *x, int hd, uint16_t *out) {
    for (int i = 0; i < hd; i++) out[i] = f32_bf16(x[i]);
}

/* layer li's key and value rows of KV head h at slot `slot`, from float32 k, v (hd,): bf16, int8 (keys rotated
   first with KV_HADAMARD), or int4's residual (bf16, plain keys: the store quantizes whole groups later) */
static void kv_write_row(const KVView *kv, int li, int h, int hd, int64_t slot, const float *k, const float *v) {
    if (kv->format == KV_INT4) {
        const int64_t row = (int64_t)h * kv->rcap + slot - kv->qlen;
        bf16_row(k, hd, (uint16_t *)kv->rk[li] + row * hd);
        bf16_row(v, hd, (uint16_t *)kv->rv[li] + row * hd);
        return;
    }
    const int64_t row = (int64_t)h * kv->cap + slot;
    if (kv->format == KV_INT8) {
        float kr[MAX_HD];
        memcpy(kr, k, sizeof(float) * hd);
        if (kv->flags & KV_HADAMARD) hadamard(kr, hd);
        quantize_row_int8(kr, hd, (int8_t *)kv->k[li] + row * hd, (float *)kv->ks[li] + row);
        quantize_row_int8(v, hd, (int8_t *)kv->v[li] + row * hd, (float *)kv->vs[li] + row);
        return;
    }
    bf16_row(k, hd, (uint16_t *)kv->k[li] + row * hd);
    bf16_row(v, hd, (uint16_t *)kv->v[li] + row * hd);
}

/* 0 if the step can write slot `start` of the view and read slots [0, start]; 1 a slot outside it, 2 a view
   it does not take */
static int check_view(const Model *M, const KVView *kv, int64_t start) {
    if (start < 0) return 1;
    if (kv->format != KV_BF16 && kv->format != KV_INT8 && kv->format != KV_INT4) return 2;
    if ((kv->flags & KV_HADAMARD) && (kv->format == KV_BF16 || (M->head_dim & (M->head_dim - 1)))) return 2;
    if (kv->format != KV_INT4) return start >= kv->cap;
    /* int4: slot `start` goes to the residual */
    if (kv->vgroup < 16 || kv->vgroup % 16 || M->head_dim % kv->vgroup) return 2; /* 16 channels at a time */
    const int64_t ql = kv->qlen;
    return ql < 0 || ql % KV_GROUP || ql > kv->cap || ql > start || start - ql >= kv->rcap;
}

/* bf16 rows (the bf16 store, int4's residual): AVX-512 where it runs and head_dim allows, else the AVX2 code */
static void attend_bf16(const Model *M, const float *q, const Rows *R, int64_t a, int64_t b, Partial *P) {
    if (kv512() && M->head_dim % 32 == 0) /* whole 32-byte row chunks (transpose_rows8), 32 value channels */
        attend_bf16_512(M, q, R, a, b, P);
    else
        attend_rows(M, q, R, a, b, P, ROWS_BF16);
}

/* layer li of a KV view, slots [a, b), in its format. q: the queries; qh: q times H (used with KV_HADAMARD) */
static void attend_view(const Model *M, const float *q, const float *qh, const KVView *kv, int li, int64_t a,
                        int64_t b, Partial *P) {
    init_partial(M, P);
    const float *qk = kv->flags & KV_HADAMARD ? qh : q; /* what the quantized keys pair with */
    if (kv->format == KV_INT8) {
        const Rows R = {.k = kv->k[li], .v = kv->v[li], .ks = kv->ks[li], .vs = kv->vs[li], .cap = kv->cap};
        if (kv512() && M->head_dim % 32 == 0) /* whole 32-byte row chunks (transpose_rows8) */
            attend_int8_512(M, qk, &R, a, b, P);
        else
            attend_rows(M, qk, &R, a, b, P, ROWS_INT8);
    } else if (kv->format == KV_INT4) {
        const int64_t ql = kv->qlen;
        if (a < ql) {
            const Rows R = {.k = kv->k[li], .v = kv->v[li], .ks = kv->ks[li], .vs = kv->vs[li], .kz = kv->kz[li],
                            .vz = kv->vz[li], .cap = kv->cap, .vg = kv->vgroup};
            const int64_t e = b < ql ? b : ql;
            const int hd = M->head_dim; /* whole key rows of 16 or 32k bytes (transpose_group) */
            if (kv512() && a % KV_GROUP == 0 && e % KV_GROUP == 0 && (hd == 32 || hd % 64 == 0) && kv->vgroup % 32 == 0)
                attend_int4_512(M, qk, &R, a, e, P);
            else
                attend_rows(M, qk, &R, a, e, P, ROWS_INT4);
        }
        if (b > ql) {
            const Rows R = {.k = kv->rk[li], .v = kv->rv[li], .cap = kv->rcap};
            attend_bf16(M, q, &R, (a > ql ? a : ql) - ql, b - ql, P);
        }
    } else {
        const Rows R = {.k = kv->k[li], .v = kv->v[li], .cap = kv->cap};
        attend_bf16(M, q, &R, a, b, P);
    }
}

/* ------------------------------------------------------------------------------------------- the step */
typedef struct {
    float x[1 << 14];      /* residual stream */
    float h[1 << 14];      /* normed input of a product */
    float qkv[1 << 15];
    float qh[1 << 15];     /* the queries times H (KV_HADAMARD) */
    float att[1 << 14];
    float mlp[1 << 17];
    QAct a4, a8;
    Partial part[MAX_THREADS];
} Work;

static Act act_for(const Mat *m, Work *W) { return act_in(m->kind == KIND_INT4 ? &W->a4 : &W->a8); }

static void quantize_for(const Mat *m, const float *x, Work *W) {
    Act a = act_for(m, W);
    quantize_act(x, m->k, m->kind == KIND_INT4, &a);
}

size_t ic_work_size(void) { return sizeof(Work); }

/* The ABI the Python side (native/__init__.py) was written against: bump IC_ABI_VERSION whenever a struct
   or an exported signature changes. Fills sizes[0..2] with sizeof(Mat), sizeof(Layer), sizeof(Model); the
   loader compares them with its ctypes structures and refuses a library that disagrees. */
#define IC_ABI_VERSION 6 /* 3: KVView and ic_decode_kv (quantized KV); 4: int4 KV and Hadamard keys in KVView,
                            ic_decode_batch over KV views; 5: ic_batch_vnni; 6: ic_kv_avx512 */
int ic_abi(int64_t *sizes) {
    sizes[0] = (int64_t)sizeof(Mat);
    sizes[1] = (int64_t)sizeof(Layer);
    sizes[2] = (int64_t)sizeof(Model);
    sizes[3] = (int64_t)sizeof(KVView);
    return IC_ABI_VERSION;
}

/* Limits the fast path checks before use (Python side); 0 if the model fits them. */
int ic_check(const Model *M) {
    if (M->dim > (1 << 14) || M->head_dim > MAX_HD || M->head_dim % 8 || M->n_heads > MAX_HEADS) return 1;
    if (M->n_heads % M->n_kv || M->n_heads / M->n_kv > MAX_GROUP) return 2;
    if ((M->n_heads + 2 * M->n_kv) * M->head_dim > (1 << 15) || 2 * M->ffn > (1 << 17)) return 3;
    if (M->dim % QB || M->ffn % QB || M->n_heads * M->head_dim % QB) return 4;
    return 0;
}

/* One token: x = embed[token]; every layer writes its key/value row at slot `start` of the KV view (bf16 or
   int8 rows, int4's residual: see KVView) and attends over slots [0, start]. Writes the final normed hidden
   state (D,) to `out_x` and, if `logits` is not NULL, the head's logits (V,). cos/sin: (hd,) for this token's
   position. */
int ic_decode_kv(const Model *M, int64_t token, const float *cos, const float *sin, const KVView *kv,
                 int64_t start, float *out_x, float *logits, void *work, int nthreads) {
    if (token < 0 || token >= M->vocab) return 1;
    const int bad = check_view(M, kv, start);
    if (bad) return bad;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    Work *W = (Work *)work;
    const int D = M->dim, H = M->n_heads, Hkv = M->n_kv, hd = M->head_dim, F = M->ffn;
    const int qs = H * hd, kvs = Hkv * hd;
    const int64_t n = start + 1;
    for (int i = 0; i < D; i++) W->x[i] = bf16_f32(M->embed[token * D + i]);

    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int li = 0; li < M->n_layers; li++) {
            const Layer *L = &M->layers[li];
            #pragma omp single
            {
                rmsnorm(W->x, L->attn_norm, D, M->eps, W->h);
                quantize_for(&L->wqkv, W->h, W);
            }
            matvec(&L->wqkv, act_for(&L->wqkv, W), W->qkv, 0);
            #pragma omp single
            {
                float *q = W->qkv, *k = W->qkv + qs, *v = W->qkv + qs + kvs;
                for (int h = 0; h < H; h++) {
                    rope(q + h * hd, cos, sin, hd);
                    for (int i = 0; i < hd; i++) q[h * hd + i] *= M->attn_scale;
                }
                if (kv->flags & KV_HADAMARD) {
                    memcpy(W->qh, q, sizeof(float) * qs);
                    for (int h = 0; h < H; h++) hadamard(W->qh + h * hd, hd);
                }
                for (int h = 0; h < Hkv; h++) {
                    rope(k + h * hd, cos, sin, hd);
                    kv_write_row(kv, li, h, hd, start, k + h * hd, v + h * hd);
                }
            }
            int64_t a, b;
            share(n, ABLK, t, nt, &a, &b);
            attend_view(M, W->qkv, W->qh, kv, li, a, b, &W->part[t]);
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int h = 0; h < H; h++) { /* merge the threads' partial softmaxes */
                float mx = -INFINITY;
                for (int p = 0; p < nt; p++) mx = W->part[p].m[h] > mx ? W->part[p].m[h] : mx;
                float l = 0.0f;
                float *o = W->att + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
                for (int p = 0; p < nt; p++) {
                    if (W->part[p].m[h] == -INFINITY) continue;
                    float c = expf(W->part[p].m[h] - mx);
                    l += W->part[p].l[h] * c;
                    for (int i = 0; i < hd; i++) o[i] += W->part[p].acc[h * hd + i] * c;
                }
                for (int i = 0; i < hd; i++) o[i] /= l;
            }
            #pragma omp single
            quantize_for(&L->wo, W->att, W);
            matvec(&L->wo, act_for(&L->wo, W), W->x, 1);
            #pragma omp single
            {
                rmsnorm(W->x, L->ffn_norm, D, M->eps, W->h);
                quantize_for(&L->win, W->h, W);
            }
            matvec(&L->win, act_for(&L->win, W), W->mlp, 0);
            share(F, 8, t, nt, &a, &b);
            silu_mul(W->mlp + a, W->mlp + F + a, b - a, W->mlp + a);
            #pragma omp barrier
            #pragma omp single
            quantize_for(&L->wout, W->mlp, W);
            matvec(&L->wout, act_for(&L->wout, W), W->x, 1);
        }
        #pragma omp single
        {
            rmsnorm(W->x, M->final_norm, D, M->eps, out_x);
            if (logits) quantize_for(&M->head, out_x, W);
        }
        if (logits) matvec(&M->head, act_for(&M->head, W), logits, 0);
    }
    return 0;
}

/* ic_decode_kv over the KV store's bf16 buffers kbufs[l]/vbufs[l] (Hkv, cap, hd) */
int ic_decode(const Model *M, int64_t token, const float *cos, const float *sin, uint16_t *const *kbufs,
              uint16_t *const *vbufs, int64_t cap, int64_t start, float *out_x, float *logits, void *work,
              int nthreads) {
    const KVView kv = {.format = KV_BF16, .cap = cap, .k = (void *const *)kbufs, .v = (void *const *)vbufs};
    return ic_decode_kv(M, token, cos, sin, &kv, start, out_x, logits, work, nthreads);
}

/* ------------------------------------------------------------------------------------------- the batched step
   B tokens, one per sequence (each with its own KV buffers, capacity and slot), through the model in one
   parallel region: every weight row is read from memory once per step and multiplied with the B activation
   rows while it sits in L1, so a step of B sequences costs about one weight read instead of B.
   Each row's arithmetic is the one-token step's, op for op (the same row products, norms, RoPE, and attention
   split into the same `nthreads` key ranges, merged in the same order), so row b's results are bit for bit
   what ic_decode gives for that sequence alone with the same thread count. */
/* With AVX-512 (BW, VNNI) and int4 or per-row int8 weights, the tokens go in the vector lanes: in a tile of
   BT = 8 rows' activations, 8 inputs of a group (chunk c: its bytes 8c..8c+7 as quantize_act stores them; int4:
   the split order, so chunks 0, 1 are the even inputs of the group's two halves and 2, 3 the odd ones) of the 8
   tokens make one 512-bit register, for each of the two levels q and q2, and one instruction multiplies them
   with the same 8 weights (one 64-bit broadcast: int4, 8 packed bytes give chunk 0's or 1's weights in their
   low nibbles and chunk 2's or 3's in their high nibbles; int8, w + 128 as unsigned bytes for dpbusd). int4
   products: maddubs (nibble x int8 pairs, summed over the 4 chunks in int16: at most 4 x 2 x 15 x 127, exact)
   widened by madd; int8: dpbusd. Token t's products end in lanes 2t, 2t+1; those of two groups are added into
   one register (tokens of group g | of group g+1) holding the groups' exact integer sums (isum, as row_int4 /
   row_int8 make them: 128 x the q sums + the q2 sums, the int8 offset taken back with the tokens' block sums,
   `corr`). Then row_int4's / row_int8's float steps run with the tokens in the lanes: accumulator (acc0 | acc1)
   gets groups g % 4 == 0 | 1, (acc2 | acc3) groups 2 | 3, added at the end as hsum4 does. So each row b's
   result is bit for bit row_int4's / row_int8's, a group's float steps are done once for 8 tokens, and BR
   weight rows share each activation load. */
#define BATCH_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))
#define BATCH_MAX 64 /* rows per batched step */
#define BT 8         /* tokens per tile */
#define BR 2         /* weight rows per kernel call */
#define BATCH_TILE_MIN 3 /* fewer rows take the one-token row products (a tile costs about 4 rows' products) */

static int batch_force = -1; /* ic_batch_vnni: -1 the CPU decides, 0 never (the AVX2 row products) */

static int batch_vnni(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vnni");
    }
    return v && batch_force != 0;
}

/* mode -1: the batched step uses the AVX-512 VNNI kernels where the CPU has them (the default); 0: never (the
   AVX2 row products every CPU runs; tests compare both). Returns whether they are used now. */
int ic_batch_vnni(int mode) {
    batch_force = mode < 0 ? -1 : mode > 0 ? 1 : 0;
    return batch_vnni();
}

/* The activation tiles of one product, Gp = G rounded up to even (an odd G's last group: zeros): tile t, group
   g (index tg = t * Gp + g): xq / xq2 (4 chunks x 8 tokens x 8 inputs) int8; dd (8,) the tokens' d / 128, sum
   (8,) their block sums, corr (8,) int32 (int8 weights: 128 x (128 sum q + sum q2)) */
typedef struct {
    int8_t *xq, *xq2;
    float *dd, *sum;
    int32_t *corr;
} Tiles;

/* int4 row r's scales of groups (g, g+1): s (g x 8 | g+1 x 8) and z - 8 s; g + 1 == G: zeros for g+1 */
BATCH_VNNI static inline __attribute__((always_inline)) void pair_sz(const uint16_t *sz, int g, int G, __m512 *s,
                                                                    __m512 *zs) {
    int64_t four; /* s_g, z_g, s_g+1, z_g+1 (bf16) */
    if (g + 1 < G) {
        memcpy(&four, sz + 2 * g, 8);
    } else {
        uint16_t t[4] = {sz[2 * g], sz[2 * g + 1], 0, 0};
        memcpy(&four, t, 8);
    }
    const __m512i v = _mm512_set1_epi64(four);
    /* each float lane's high half <- the bf16 (its low half 0): lanes 0-7 from word 0 / 1, 8-15 from word 2 / 3 */
    const __m512i is = _mm512_set_epi16(2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0);
    const __m512i iz = _mm512_add_epi16(is, _mm512_set1_epi16(1));
    *s = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, is, v));
    const __m512 z = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, iz, v));
    *zs = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), *s, z); /* z - 8 s: 8 s is exact, one rounding as row_int4's */
}

/* NP pairs of groups (from group 2p) of NR (<= BR) weight rows r0.. against one tile: acc[k][i] (group g | g+1
   x 8 tokens) += the pair's float steps for row i. The NP x 2 x NR integer chains are interleaved. */
BATCH_VNNI static inline __attribute__((always_inline)) void tile_pairs(
    const Mat *m, int64_t r0, int p, const Tiles *T, int64_t tg, __m512 acc[][BR], const int NP, const int NR,
    const int int4) {
    const int G = m->k / QB;
    __m512i is[4][BR]; /* group 2p + k, row i: exact int32 sums, token t in lanes 2t, 2t+1 */
    if (int4) {
        const __m512i m4 = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi16(1);
        for (int k = 0; k < 2 * NP; k++) {
            const int g = 2 * p + k;
            const int8_t *x = T->xq + (tg + k) * 256, *x2 = T->xq2 + (tg + k) * 256;
            for (int i = 0; i < NR; i++) {
                if (g >= G) { /* an odd G's zero group */
                    is[k][i] = _mm512_setzero_si512();
                    continue;
                }
                const uint8_t *w = m->q + (r0 + i) * (m->k / 2) + 16 * g;
                int64_t b0, b1;
                memcpy(&b0, w, 8);
                memcpy(&b1, w + 8, 8);
                const __m512i q0 = _mm512_set1_epi64(b0), q1 = _mm512_set1_epi64(b1);
                const __m512i w0 = _mm512_and_si512(q0, m4), w1 = _mm512_and_si512(q1, m4);
                const __m512i w2 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
                const __m512i w3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
                __m512i a = _mm512_maddubs_epi16(w0, _mm512_load_si512((const void *)x));
                a = _mm512_add_epi16(a, _mm512_maddubs_epi16(w1, _mm512_load_si512((const void *)(x + 64))));
                a = _mm512_add_epi16(a, _mm512_maddubs_epi16(w2, _mm512_load_si512((const void *)(x + 128))));
                a = _mm512_add_epi16(a, _mm512_maddubs_epi16(w3, _mm512_load_si512((const void *)(x + 192))));
                __m512i b = _mm512_maddubs_epi16(w0, _mm512_load_si512((const void *)x2));
                b = _mm512_add_epi16(b, _mm512_maddubs_epi16(w1, _mm512_load_si512((const void *)(x2 + 64))));
                b = _mm512_add_epi16(b, _mm512_maddubs_epi16(w2, _mm512_load_si512((const void *)(x2 + 128))));
                b = _mm512_add_epi16(b, _mm512_maddubs_epi16(w3, _mm512_load_si512((const void *)(x2 + 192))));
                is[k][i] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_madd_epi16(a, ones), 7), _mm512_madd_epi16(b, ones));
            }
        }
    } else {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (int k = 0; k < 2 * NP; k++) {
            const int g = 2 * p + k;
            const int8_t *x = T->xq + (tg + k) * 256, *x2 = T->xq2 + (tg + k) * 256;
            for (int i = 0; i < NR; i++) {
                if (g >= G) { /* an odd G's zero group */
                    is[k][i] = _mm512_setzero_si512();
                    continue;
                }
                int64_t e[4];
                memcpy(e, (const int8_t *)m->q + (r0 + i) * m->k + QB * g, 32);
                __m512i wb[4];
                for (int c = 0; c < 4; c++) wb[c] = _mm512_xor_si512(_mm512_set1_epi64(e[c]), flip);
                __m512i a = _mm512_setzero_si512();
                for (int c = 0; c < 4; c++) a = _mm512_dpbusd_epi32(a, wb[c], _mm512_load_si512((const void *)(x + 64 * c)));
                a = _mm512_slli_epi32(a, 7); /* q2 on top of 128 x the q sums */
                for (int c = 0; c < 4; c++) a = _mm512_dpbusd_epi32(a, wb[c], _mm512_load_si512((const void *)(x2 + 64 * c)));
                is[k][i] = a;
            }
        }
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int k = 0; k < NP; k++) {
        const int64_t tk = tg + 2 * k; /* groups tk, tk + 1: their dd / sum / corr are 16 values in a row */
        const __m512 dd = _mm512_load_ps(T->dd + tk * BT);
        for (int i = 0; i < NR; i++) {
            const __m512i a = is[2 * k][i], b = is[2 * k + 1][i];
            __m512i sum = _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
            __m512 v = acc[k][i];
            if (int4) {
                __m512 sv, zsv;
                pair_sz(m->s + (r0 + i) * G * 2, 2 * (p + k), G, &sv, &zsv);
                v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(sv, dd), v);
                v = _mm512_fmadd_ps(zsv, _mm512_load_ps(T->sum + tk * BT), v);
            } else {
                sum = _mm512_sub_epi32(sum, _mm512_load_si512((const void *)(T->corr + tk * BT)));
                v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dd, v);
            }
            acc[k][i] = v;
        }
    }
}

/* NR weight rows r0.. x tile `t` (its 8 tokens) -> out[i][token] (int8: before the row's scale) */
BATCH_VNNI static inline __attribute__((always_inline)) void tile_rows(
    const Mat *m, int64_t r0, const Tiles *T, int64_t t, float out[][BT], const int NR, const int int4) {
    __m512 acc[2][BR]; /* row i: (acc0 | acc1), (acc2 | acc3) */
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < NR; i++) acc[k][i] = _mm512_setzero_ps();
    const int P = (m->k / QB + 1) / 2;
    const int64_t tg = t * (2 * P);
    int p = 0;
    for (; p + 2 <= P; p += 2) tile_pairs(m, r0, p, T, tg + 2 * p, acc, 2, NR, int4);
    if (p < P) tile_pairs(m, r0, p, T, tg + 2 * p, acc, 1, NR, int4); /* groups g % 4 == 0, 1 */
    for (int i = 0; i < NR; i++) {
        const __m512 s = _mm512_add_ps(acc[0][i], acc[1][i]); /* (acc0 + acc2 | acc1 + acc3) */
        _mm256_storeu_ps(out[i], _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1)));
    }
}

/* rows b of the quantized activations -> tiles of bt (8 or 4) tokens; rows [B, tiles * bt) and an odd G's last
   group are zeros. bt 8: chunk c (inputs 8c..8c+7 of the group as stored) of token j at 64 c + 8 j; bt 4: the
   group's first 16 inputs of token j at 16 j, its last 16 at 64 + 16 j */
BATCH_VNNI static void tile_acts(const Act *acts, int B, int k, const Tiles *T, const int bt) {
    const int G = k / QB, Gp = G + G % 2, tiles = (B + bt - 1) / bt;
    #pragma omp for schedule(static)
    for (int b = 0; b < tiles * bt; b++) {
        const int64_t t = b / bt, lane = b % bt;
        for (int g = 0; g < Gp; g++) {
            const int64_t tg = t * Gp + g;
            int8_t *dq = T->xq + tg * (bt * QB), *dq2 = T->xq2 + tg * (bt * QB);
            const int zero = b >= B || g >= G;
            for (int c = 0; c < QB / 8; c++) {
                const int64_t off = bt == 8 ? 64 * c + 8 * lane : 64 * (c / 2) + 16 * lane + 8 * (c % 2);
                if (zero) {
                    memset(dq + off, 0, 8), memset(dq2 + off, 0, 8);
                } else {
                    memcpy(dq + off, acts[b].q + QB * g + 8 * c, 8);
                    memcpy(dq2 + off, acts[b].q2 + QB * g + 8 * c, 8);
                }
            }
            if (zero) {
                T->dd[tg * bt + lane] = T->sum[tg * bt + lane] = 0.0f;
                T->corr[tg * bt + lane] = 0;
                continue;
            }
            const Act *a = &acts[b];
            const __m256i one = _mm256_set1_epi8(1);
            const __m256i s1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), one, _mm256_loadu_si256((const __m256i *)(a->q + QB * g)));
            const __m256i s2 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), one, _mm256_loadu_si256((const __m256i *)(a->q2 + QB * g)));
            T->dd[tg * bt + lane] = a->d[g] * (1.0f / 128);
            T->sum[tg * bt + lane] = a->sum[g];
            T->corr[tg * bt + lane] = 128 * (128 * hsum_epi32(s1) + hsum_epi32(s2));
        }
    }
}

/* The 4-token tiles (3 or 4 rows: an 8-token tile would be half padding): one 512-bit register holds 4 tokens x
   16 inputs of a group (its first or last 16 as stored), the weights a 128-bit broadcast of the matching 16
   (int4: one group's 16 packed bytes, low nibbles against the first 16 inputs, high against the last; int8: w +
   128). Token t's products end in lanes 4t..4t+3, folded to one sum per token and group, the two groups of a
   pair in one 256-bit register (4 tokens of g | 4 of g+1); the float steps as in tile_pairs. */
BATCH_VNNI static inline __attribute__((always_inline)) void tile4_pair(
    const Mat *m, int64_t r0, int p, const Tiles *T, int64_t tg, __m256 *acc, const int NR, const int int4) {
    const int G = m->k / QB;
    __m512i is[2][BR];
    for (int k = 0; k < 2; k++) {
        const int g = 2 * p + k;
        const int8_t *x = T->xq + (tg + k) * 128, *x2 = T->xq2 + (tg + k) * 128;
        for (int i = 0; i < NR; i++) {
            if (g >= G) {
                is[k][i] = _mm512_setzero_si512();
                continue;
            }
            if (int4) {
                const __m512i m4 = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi16(1);
                const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(m->q + (r0 + i) * (m->k / 2) + 16 * g)));
                const __m512i wl = _mm512_and_si512(v, m4), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                const __m512i a = _mm512_add_epi16(_mm512_maddubs_epi16(wl, _mm512_load_si512((const void *)x)),
                                                   _mm512_maddubs_epi16(wh, _mm512_load_si512((const void *)(x + 64))));
                const __m512i b = _mm512_add_epi16(_mm512_maddubs_epi16(wl, _mm512_load_si512((const void *)x2)),
                                                   _mm512_maddubs_epi16(wh, _mm512_load_si512((const void *)(x2 + 64))));
                is[k][i] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_madd_epi16(a, ones), 7), _mm512_madd_epi16(b, ones));
            } else {
                const __m512i flip = _mm512_set1_epi8((char)0x80);
                const int8_t *w = (const int8_t *)m->q + (r0 + i) * m->k + QB * g;
                const __m512i w0 = _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)w)), flip);
                const __m512i w1 = _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(w + 16))), flip);
                __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_load_si512((const void *)x));
                a = _mm512_dpbusd_epi32(a, w1, _mm512_load_si512((const void *)(x + 64)));
                a = _mm512_slli_epi32(a, 7);
                a = _mm512_dpbusd_epi32(a, w0, _mm512_load_si512((const void *)x2));
                is[k][i] = _mm512_dpbusd_epi32(a, w1, _mm512_load_si512((const void *)(x2 + 64)));
            }
        }
    }
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m256 dd = _mm256_load_ps(T->dd + tg * 4);
    for (int i = 0; i < NR; i++) {
        const __m512i a = is[0][i], b = is[1][i];
        const __m512i h = _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
        __m256i sum = _mm512_cvtepi64_epi32(_mm512_add_epi32(h, _mm512_srli_epi64(h, 32))); /* (g: 4 | g+1: 4) */
        __m256 v = acc[i];
        if (int4) {
            __m512 sv, zsv;
            pair_sz(m->s + (r0 + i) * G * 2, 2 * p, G, &sv, &zsv);
            /* lanes 0-7 of sv are s_g, 8-15 s_g+1: (s_g x 4 | s_g+1 x 4) */
            const __m256i pick = _mm256_set_epi32(11, 10, 9, 8, 3, 2, 1, 0);
            const __m256 s4 = _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_castsi256_si512(pick), sv));
            const __m256 z4 = _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_castsi256_si512(pick), zsv));
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(s4, dd), v);
            v = _mm256_fmadd_ps(z4, _mm256_load_ps(T->sum + tg * 4), v);
        } else {
            sum = _mm256_sub_epi32(sum, _mm256_load_si256((const __m256i *)(T->corr + tg * 4)));
            v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), dd, v);
        }
        acc[i] = v;
    }
}

BATCH_VNNI static inline __attribute__((always_inline)) void tile4_rows(
    const Mat *m, int64_t r0, const Tiles *T, float out[][BT], const int NR, const int int4) {
    __m256 acc[2][BR]; /* row i: (acc0 | acc1), (acc2 | acc3) over 4 tokens */
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < NR; i++) acc[k][i] = _mm256_setzero_ps();
    const int P = (m->k / QB + 1) / 2;
    for (int p = 0; p < P; p++) tile4_pair(m, r0, p, T, 2 * p, acc[p % 2], NR, int4);
    for (int i = 0; i < NR; i++) {
        const __m256 s = _mm256_add_ps(acc[0][i], acc[1][i]);
        _mm_storeu_ps(out[i], _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    }
}

/* weight rows [r0, r0 + nr) (nr <= BR) against all tiles -> v[b * BR + i] */
BATCH_VNNI static void rows_vnni(const Mat *m, int64_t r0, int nr, const Tiles *T, int B, float *v) {
    const int int4 = m->kind == KIND_INT4, tiles = (B + BT - 1) / BT;
    float out[BR][BT];
    if (B <= 4) {
        if (nr == BR && int4)
            tile4_rows(m, r0, T, out, BR, 1);
        else if (nr == BR)
            tile4_rows(m, r0, T, out, BR, 0);
        else if (int4)
            tile4_rows(m, r0, T, out, 1, 1);
        else
            tile4_rows(m, r0, T, out, 1, 0);
        for (int i = 0; i < nr; i++)
            for (int j = 0; j < B; j++) v[(int64_t)j * BR + i] = int4 ? out[i][j] : out[i][j] * bf16_f32(m->s[r0 + i]);
        return;
    }
    for (int t = 0; t < tiles; t++) {
        if (nr == BR && int4)
            tile_rows(m, r0, T, t, out, BR, 1);
        else if (nr == BR)
            tile_rows(m, r0, T, t, out, BR, 0);
        else if (int4)
            tile_rows(m, r0, T, t, out, 1, 1);
        else
            tile_rows(m, r0, T, t, out, 1, 0);
        for (int i = 0; i < nr; i++) {
            const float rs = int4 ? 1.0f : bf16_f32(m->s[r0 + i]);
            for (int j = 0; j < BT && t * BT + j < B; j++)
                v[(int64_t)(t * BT + j) * BR + i] = int4 ? out[i][j] : out[i][j] * rs;
        }
    }
}

typedef struct {    /* the batched step's scratch, carved out of one buffer (ic_batch_work_size) */
    float *x, *h, *qkv, *att, *mlp; /* (B, D), (B, D), (B, qkv), (B, H*hd), (B, 2F) */
    int8_t *q, *q2;                 /* (B, kmax) quantized activations */
    float *d, *sum;                 /* (B, kmax / QB) */
    Tiles tiles;                    /* (tiles * BT, kmax) bytes each, (tiles * BT, kmax / QB) each */
    Partial *part;                  /* (B, nparts) */
    int kmax, vnni;
} BatchWork;

static int batch_kmax(const Model *M) {
    int k = M->dim > M->ffn ? M->dim : M->ffn;
    return k > M->n_heads * M->head_dim ? k : M->n_heads * M->head_dim;
}

static int batch_parts(int nthreads) { return nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads; }

static size_t batch_floats(const Model *M, int B) {
    const int64_t qkv = (int64_t)(M->n_heads + 2 * M->n_kv) * M->head_dim;
    return (size_t)B * (2 * (size_t)M->dim + (size_t)qkv + (size_t)M->n_heads * M->head_dim + 2 * (size_t)M->ffn);
}

static size_t batch_tile_bytes(const Model *M, int B) { /* xq, xq2, dd, sum, corr of all tiles */
    const size_t rows = (size_t)(B + BT - 1) / BT * BT, kmax = (size_t)batch_kmax(M) + 2 * QB;
    return rows * (2 * kmax + 3 * sizeof(float) * (kmax / QB));
}

size_t ic_batch_work_size(const Model *M, int B, int nthreads) {
    const size_t kmax = (size_t)batch_kmax(M);
    return 64 + sizeof(Partial) * (size_t)B * batch_parts(nthreads) + sizeof(float) * batch_floats(M, B) +
           (size_t)B * (2 * kmax + 2 * sizeof(float) * (kmax / QB)) + 64 + batch_tile_bytes(M, B) + 64;
}

static uint8_t *align64(void *p) { return (uint8_t *)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

static BatchWork batch_work(const Model *M, int B, int nparts, void *work) {
    BatchWork W;
    const int64_t qkv = (int64_t)(M->n_heads + 2 * M->n_kv) * M->head_dim;
    uint8_t *p = align64(work);
    W.part = (Partial *)p;
    p += sizeof(Partial) * (size_t)B * nparts;
    float *f = (float *)p;
    W.x = f, f += (int64_t)B * M->dim;
    W.h = f, f += (int64_t)B * M->dim;
    W.qkv = f, f += B * qkv;
    W.att = f, f += (int64_t)B * M->n_heads * M->head_dim;
    W.mlp = f, f += (int64_t)B * 2 * M->ffn;
    W.kmax = batch_kmax(M);
    W.d = f, f += (int64_t)B * (W.kmax / QB);
    W.sum = f, f += (int64_t)B * (W.kmax / QB);
    W.q = (int8_t *)f;
    W.q2 = W.q + (int64_t)B * W.kmax;
    p = align64(W.q2 + (int64_t)B * W.kmax);
    const int64_t rows = (B + BT - 1) / BT * BT, gmax = W.kmax / QB + 2 - (W.kmax / QB) % 2; /* even: + an odd G's zero group, and 64-byte aligned rows */
    W.tiles.xq = (int8_t *)p, p += rows * gmax * QB;
    W.tiles.xq2 = (int8_t *)p, p += rows * gmax * QB;
    W.tiles.dd = (float *)p, p += rows * gmax * sizeof(float);
    W.tiles.sum = (float *)p, p += rows * gmax * sizeof(float);
    W.tiles.corr = (int32_t *)p, p += rows * gmax * sizeof(int32_t);
    W.vnni = batch_vnni();
    return W;
}

static inline Act batch_act(const BatchWork *W, int b) {
    return (Act){W->q + (int64_t)b * W->kmax, W->q2 + (int64_t)b * W->kmax, W->d + (int64_t)b * (W->kmax / QB),
                 W->sum + (int64_t)b * (W->kmax / QB)};
}

/* whether m's product of B rows takes the VNNI kernels (else each row's row_dot, as the one-token step) */
static inline int batch_fast(const Mat *m, const BatchWork *W, int B) {
    return W->vnni && B >= BATCH_TILE_MIN && (m->kind == KIND_INT4 || m->kind == KIND_INT8);
}

/* y[b] = W x[b] (+ bias) (+ y[b] if `accumulate`) for the B quantized rows of W->q..; y rows `ldy` apart.
   Weight rows split over the team; each one serves all B rows while it is in L1. Ends with the loop's barrier. */
static void matvec_batch(const Mat *m, const BatchWork *W, int B, float *y, int64_t ldy, int accumulate) {
    const int64_t n = m->n;
    Act acts[BATCH_MAX];
    for (int b = 0; b < B; b++) acts[b] = batch_act(W, b);
    if (batch_fast(m, W, B)) {
        tile_acts(acts, B, m->k, &W->tiles, B <= 4 ? 4 : BT);
        #pragma omp for schedule(static)
        for (int64_t rp = 0; rp < (n + BR - 1) / BR; rp++) {
            const int64_t r0 = rp * BR;
            const int nr = (int)(n - r0 < BR ? n - r0 : BR);
            float v[BATCH_MAX * BR];
            rows_vnni(m, r0, nr, &W->tiles, B, v);
            for (int i = 0; i < nr; i++)
                for (int b = 0; b < B; b++) {
                    float vb = v[b * BR + i];
                    if (m->bias) vb += m->bias[r0 + i];
                    float *yb = y + b * ldy;
                    yb[r0 + i] = accumulate ? yb[r0 + i] + vb : vb;
                }
        }
        return;
    }
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float v[BATCH_MAX];
        int b = 0; /* int4 / int8: up to 4 rows per pass over the weight row */
        if (m->kind == KIND_INT4) {
            for (; b + 4 <= B; b += 4) rows_int4(m, r, acts + b, v + b, 4);
            for (; b + 2 <= B; b += 2) rows_int4(m, r, acts + b, v + b, 2);
        } else if (m->kind == KIND_INT8) {
            for (; b + 4 <= B; b += 4) rows_int8(m, r, acts + b, v + b, 4);
            for (; b + 2 <= B; b += 2) rows_int8(m, r, acts + b, v + b, 2);
        }
        for (; b < B; b++) v[b] = row_dot(m, r, &acts[b]);
        for (b = 0; b < B; b++) {
            float vb = v[b];
            if (m->bias) vb += m->bias[r];
            float *yb = y + b * ldy;
            yb[r] = accumulate ? yb[r] + vb : vb;
        }
    }
}

/* rows b of `src` (B rows, `ld` apart) quantized for m, one row per iteration of a worksharing loop */
static void quantize_batch(const Mat *m, const float *src, int64_t ld, const BatchWork *W, int B) {
    #pragma omp for schedule(static)
    for (int b = 0; b < B; b++) {
        Act a = batch_act(W, b);
        quantize_act(src + b * ld, m->k, m->kind == KIND_INT4, &a);
    }
}

/* tokens (B,); cos/sin (B, hd); views (B,): row b's KV view (any format ic_decode_kv takes, see KVView);
   starts (B,): its slot. out_x (B, D) final normed hidden states; logits (B, head rows) or NULL. `work`: at least
   ic_batch_work_size(M, B, nthreads) bytes. */
int ic_decode_batch(const Model *M, int B, const int64_t *tokens, const float *cos, const float *sin,
                    const KVView *views, const int64_t *starts, float *out_x, float *logits, void *work,
                    int nthreads) {
    if (B < 1 || B > BATCH_MAX) return 1;
    for (int b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= M->vocab) return 1;
        const int bad = check_view(M, &views[b], starts[b]);
        if (bad) return bad;
    }
    const int nparts = batch_parts(nthreads);
    const BatchWork W = batch_work(M, B, nparts, work);
    const int D = M->dim, H = M->n_heads, Hkv = M->n_kv, hd = M->head_dim, F = M->ffn, NL = M->n_layers;
    const int qs = H * hd, kvs = Hkv * hd, QKV = qs + 2 * kvs;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < D; i++) W.x[(int64_t)b * D + i] = bf16_f32(M->embed[tokens[b] * D + i]);

    #pragma omp parallel num_threads(nparts)
    {
        for (int li = 0; li < NL; li++) {
            const Layer *L = &M->layers[li];
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                rmsnorm(W.x + (int64_t)b * D, L->attn_norm, D, M->eps, W.h + (int64_t)b * D);
                Act a = batch_act(&W, b);
                quantize_act(W.h + (int64_t)b * D, L->wqkv.k, L->wqkv.kind == KIND_INT4, &a);
            }
            matvec_batch(&L->wqkv, &W, B, W.qkv, QKV, 0);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                float *q = W.qkv + (int64_t)b * QKV, *k = q + qs, *v = q + qs + kvs;
                const float *cb = cos + (int64_t)b * hd, *sb = sin + (int64_t)b * hd;
                for (int h = 0; h < H; h++) {
                    rope(q + h * hd, cb, sb, hd);
                    for (int i = 0; i < hd; i++) q[h * hd + i] *= M->attn_scale;
                }
                for (int h = 0; h < Hkv; h++) {
                    rope(k + h * hd, cb, sb, hd);
                    kv_write_row(&views[b], li, h, hd, starts[b], k + h * hd, v + h * hd);
                }
            }
            #pragma omp for schedule(dynamic, 1)
            for (int task = 0; task < B * nparts; task++) { /* row b's key range p, as ic_decode's thread p */
                const int b = task / nparts, p = task % nparts;
                const float *qb = W.qkv + (int64_t)b * QKV;
                const int rot = views[b].flags & KV_HADAMARD;
                float qh[rot ? qs : 1]; /* the queries times H, made per task as ic_decode_kv makes them */
                if (rot) {
                    memcpy(qh, qb, sizeof(float) * qs);
                    for (int h = 0; h < H; h++) hadamard(qh + h * hd, hd);
                }
                int64_t a, e;
                share(starts[b] + 1, ABLK, p, nparts, &a, &e);
                attend_view(M, qb, qh, &views[b], li, a, e, &W.part[task]);
            }
            #pragma omp for schedule(static)
            for (int bh = 0; bh < B * H; bh++) { /* merge each row's partial softmaxes, in ic_decode's order */
                const int b = bh / H, h = bh % H;
                const Partial *P = W.part + (int64_t)b * nparts;
                float mx = -INFINITY;
                for (int p = 0; p < nparts; p++) mx = P[p].m[h] > mx ? P[p].m[h] : mx;
                float l = 0.0f;
                float *o = W.att + ((int64_t)b * H + h) * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.0f;
                for (int p = 0; p < nparts; p++) {
                    if (P[p].m[h] == -INFINITY) continue;
                    float c = expf(P[p].m[h] - mx);
                    l += P[p].l[h] * c;
                    for (int i = 0; i < hd; i++) o[i] += P[p].acc[h * hd + i] * c;
                }
                for (int i = 0; i < hd; i++) o[i] /= l;
            }
            quantize_batch(&L->wo, W.att, qs, &W, B);
            matvec_batch(&L->wo, &W, B, W.x, D, 1);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                rmsnorm(W.x + (int64_t)b * D, L->ffn_norm, D, M->eps, W.h + (int64_t)b * D);
                Act a = batch_act(&W, b);
                quantize_act(W.h + (int64_t)b * D, L->win.k, L->win.kind == KIND_INT4, &a);
            }
            matvec_batch(&L->win, &W, B, W.mlp, 2 * F, 0);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                float *mb = W.mlp + (int64_t)b * 2 * F;
                silu_mul(mb, mb + F, F, mb);
                Act a = batch_act(&W, b);
                quantize_act(mb, L->wout.k, L->wout.kind == KIND_INT4, &a);
            }
            matvec_batch(&L->wout, &W, B, W.x, D, 1);
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            rmsnorm(W.x + (int64_t)b * D, M->final_norm, D, M->eps, out_x + (int64_t)b * D);
            if (logits) {
                Act a = batch_act(&W, b);
                quantize_act(out_x + (int64_t)b * D, M->head.k, M->head.kind == KIND_INT4, &a);
            }
        }
        if (logits) matvec_batch(&M->head, &W, B, logits, M->head.n, 0);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------- prompt attention
   Causal attention of a float32 prompt (T query rows at slots start..start+T-1) over cache slots [0, start+T),
   with AVX-512 (used only where the CPU has it; the caller checks). One task = one KV head x PQ query rows:
   its G query heads' rows share every key/value block, widened to float32 once per task (keys transposed),
   and two register-tiled products per block of PK keys: scores S = Q K^T (4 rows x 64 keys in 16 registers)
   and O += P V (4 rows x hd). Online softmax per row, as in flash attention. */
#define PQ 32
#define PK 64

/* One task. NV = hd / 16 (4 or 8), R rows per register tile. kt: this KV head's keys transposed (hd, ldk) and
   vv its values (kend, hd), float32. */
AVX512 static inline __attribute__((always_inline)) void prompt_attn_task(
    const float *q, int64_t q_sh, int64_t q_st, const float *kt, int64_t ldk, const float *vv, int64_t start,
    int64_t t0, int64_t t1, int kh, int G, float scale, float *out, int H, const int NV, const int R) {
    const int hd = NV * 16;
    const int nq = (int)(t1 - t0), rows = G * nq;
    /* on the thread's stack: ~50 KB for G = 3, hd = 64; ~100 KB for G = 4, hd = 128 */
    float Q[rows * hd] __attribute__((aligned(64)));
    float O[rows * hd] __attribute__((aligned(64)));
    float P[rows * PK] __attribute__((aligned(64)));
    float m[rows], l[rows], corr[rows];
    int64_t pos[rows];
    for (int g = 0; g < G; g++)
        for (int i = 0; i < nq; i++) { /* row r = g * nq + i: head kh*G+g, slot start+t0+i */
            const int r = g * nq + i;
            const float *src = q + (int64_t)(kh * G + g) * q_sh + (t0 + i) * q_st;
            for (int d = 0; d < hd; d++) Q[r * hd + d] = src[d] * scale;
            memset(O + r * hd, 0, sizeof(float) * hd);
            m[r] = -INFINITY;
            l[r] = 0.0f;
            pos[r] = start + t0 + i;
        }
    const int64_t kend = start + t1; /* keys [0, kend) */
    for (int64_t k0 = 0; k0 < kend; k0 += PK) {
        const int nk = (int)(kend - k0 < PK ? kend - k0 : PK);
        for (int r0 = 0; r0 < rows; r0 += R) {
            const int rn = rows - r0 < R ? rows - r0 : R;
            int64_t pmax = pos[r0];
            for (int i = 1; i < rn; i++) pmax = pos[r0 + i] > pmax ? pos[r0 + i] : pmax;
            if (k0 > pmax) continue; /* the whole block is in these rows' future */
            __m512 s[6][4];
            for (int i = 0; i < R; i++)
                for (int c = 0; c < 4; c++) s[i][c] = _mm512_setzero_ps();
            for (int d = 0; d < hd; d++) { /* S = Q K^T: R rows x 64 keys */
                const float *kr = kt + d * ldk + k0;
                __m512 k4[4];
                for (int c = 0; c < 4; c++) k4[c] = _mm512_loadu_ps(kr + c * 16);
                for (int i = 0; i < R; i++) {
                    __m512 b = _mm512_set1_ps(Q[(r0 + (i < rn ? i : 0)) * hd + d]);
                    for (int c = 0; c < 4; c++) s[i][c] = _mm512_fmadd_ps(b, k4[c], s[i][c]);
                }
            }
            for (int i = 0; i < rn; i++) { /* causal mask, online softmax; P row */
                const int r = r0 + i;
                const int64_t lim = pos[r] - k0 + 1 < nk ? pos[r] - k0 + 1 : nk; /* valid keys: j < lim */
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int c = 0; c < 4; c++) {
                    int64_t left = lim - c * 16;
                    __mmask16 ok = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                    s[i][c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok, s[i][c]);
                    mx = _mm512_max_ps(mx, s[i][c]);
                }
                const float bmax = _mm512_reduce_max_ps(mx);
                const float mnew = bmax > m[r] ? bmax : m[r];
                corr[r] = m[r] == -INFINITY ? 0.0f : expf(m[r] - mnew);
                m[r] = mnew;
                __m512 ls = _mm512_setzero_ps();
                for (int c = 0; c < 4; c++) {
                    __m512 p = exp16(_mm512_sub_ps(s[i][c], _mm512_set1_ps(mnew)));
                    _mm512_store_ps(P + r * PK + c * 16, p);
                    ls = _mm512_add_ps(ls, p);
                }
                l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(ls);
            }
            __m512 o[6][8]; /* O = O * corr + P V: R rows x hd */
            for (int i = 0; i < R; i++) {
                const int r = r0 + (i < rn ? i : 0);
                const __m512 cr = _mm512_set1_ps(corr[r]);
                for (int c = 0; c < NV; c++) o[i][c] = _mm512_mul_ps(_mm512_load_ps(O + r * hd + c * 16), cr);
            }
            const float *vb = vv + k0 * hd;
            for (int j = 0; j < nk; j++) {
                __m512 v8[8];
                for (int c = 0; c < NV; c++) v8[c] = _mm512_loadu_ps(vb + j * hd + c * 16);
                for (int i = 0; i < R; i++) {
                    __m512 b = _mm512_set1_ps(P[(r0 + (i < rn ? i : 0)) * PK + j]);
                    for (int c = 0; c < NV; c++) o[i][c] = _mm512_fmadd_ps(b, v8[c], o[i][c]);
                }
            }
            for (int i = 0; i < rn; i++)
                for (int c = 0; c < NV; c++) _mm512_store_ps(O + (r0 + i) * hd + c * 16, o[i][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int i = 0; i < nq; i++) {
            const int r = g * nq + i;
            float *dst = out + ((t0 + i) * H + kh * G + g) * (int64_t)hd;
            const float inv = 1.0f / l[r];
            for (int d = 0; d < hd; d++) dst[d] = O[r * hd + d] * inv;
        }
}

/* q[h, t, d] at q + h*q_sh + t*q_st + d; kt (Hkv, hd, ldk): keys transposed; v (Hkv, ldv, hd); all float32, keys
   and values at slots [0, start+T). out (T, H, hd). Returns nonzero for shapes it does not take (head_dim not
   64 or 128, more than MAX_GROUP query heads per KV head). */
AVX512 int ic_prompt_attention(const float *q, int64_t q_sh, int64_t q_st, const float *kt, int64_t ldk,
                               const float *v, int64_t ldv, int64_t start, int64_t T, int H, int Hkv, int hd,
                               float scale, float *out, int nthreads) {
    if ((hd != 64 && hd != 128) || H % Hkv || H / Hkv > MAX_GROUP || start + T > ldk || start + T > ldv) return 1;
    const int G = H / Hkv;
    const int64_t nblk = (T + PQ - 1) / PQ;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t task = 0; task < nblk * Hkv; task++) {
        const int64_t b = nblk - 1 - task / Hkv; /* the longest (latest) query blocks first */
        const int kh = (int)(task % Hkv);
        const int64_t t0 = b * PQ, t1 = t0 + PQ < T ? t0 + PQ : T;
        const float *ktk = kt + (int64_t)kh * hd * ldk, *vk = v + (int64_t)kh * ldv * hd;
        if (hd == 64)
            prompt_attn_task(q, q_sh, q_st, ktk, ldk, vk, start, t0, t1, kh, G, scale, out, H, 4, 6);
        else
            prompt_attn_task(q, q_sh, q_st, ktk, ldk, vk, start, t0, t1, kh, G, scale, out, H, 8, 3);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------- prompt row ops
   Row-wise element ops of a float32 prompt (many rows): each one pass over memory instead of PyTorch's
   several (RMSNorm is 6 ops there, RoPE 4, SiLU-and-multiply 3). Same formulas, float32 throughout. */

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, rows of (T, D); w float32 */
void ic_rmsnorm_rows(const float *x, const float *w, int64_t T, int D, float eps, float *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++) rmsnorm(x + t * D, w, D, eps, out + t * D);
}

/* In place, the first nh heads (of hd) of each row of x (T rows, ld apart), with the row's cos/sin (T, hd) */
void ic_rope_rows(float *x, int64_t T, int64_t ld, int nh, int hd, const float *cos, const float *sin, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++)
        for (int k = 0; k < nh; k++) rope(x + t * ld + (int64_t)k * hd, cos + t * hd, sin + t * hd, hd);
}

/* out (T, F) = silu(h[:, :F]) * h[:, F:] for h (T, 2F) */
void ic_silu_mul_rows(const float *hm, int64_t T, int F, float *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++) silu_mul(hm + t * 2 * (int64_t)F, hm + t * 2 * (int64_t)F + F, F, out + t * F);
}

/* ------------------------------------------------------------------------------------------- multi-token products
   y (T, N) = x (T, K) W^T (+ bias) for the PyTorch path's calls of more than one token (and its one-token calls
   where the native step does not run). int8 weights (per row or per group): activations rounded to int16 per
   block of 32 (x ~ d * q, |q| <= 32767: finer than the decode step's two int8 levels), products with
   madd_epi16 over the weights widened to int16 once per block and applied to TT tokens; blocks of RB weight
   rows stay in L1 while every token passes over them. int4 weights: the decode step's row products per token. */
#define RB 16
#define TT 4

static void quantize_act16(const float *x, int k, int16_t *q, float *d, float *sum) {
    for (int g = 0; g < k / QB; g++) {
        const float *xb = x + g * QB;
        const float amax = block_stats(xb, &sum[g]);
        d[g] = amax / 32767.0f;
        const float inv = amax > 0 ? 32767.0f / amax : 0.0f;
        for (int i = 0; i < QB; i++) q[g * QB + i] = (int16_t)rintf(xb[i] * inv);
    }
}

/* rows [r0, r1) of an int8 weight (`grouped`: per-group scale and zero, else per-row scale) for tokens
   [t0, t0 + nt), nt <= TT; q/d/sum: all tokens' int16 activations */
static inline __attribute__((always_inline)) void rows_int8_x16(
    const Mat *m, int64_t r0, int64_t r1, int64_t t0, int nt, const int16_t *q, const float *d, const float *sum,
    float *y, const int grouped) {
    const int64_t K = m->k, N = m->n, G = K / QB;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *w = (const int8_t *)m->q + r * K;
        const uint16_t *sz = m->s + r * G * 2;
        __m256 acc[TT];
        float zacc[TT];
        for (int j = 0; j < TT; j++) {
            acc[j] = _mm256_setzero_ps();
            zacc[j] = 0.0f;
        }
        for (int64_t g = 0; g < G; g++) {
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + QB * g)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + QB * g + 16)));
            const float sg = grouped ? bf16_f32(sz[2 * g]) : 1.0f;
            for (int j = 0; j < nt; j++) {
                const int16_t *x = q + (t0 + j) * K + QB * g;
                __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x)),
                                             _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16))));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sg * d[(t0 + j) * G + g]), acc[j]);
                if (grouped) zacc[j] += bf16_f32(sz[2 * g + 1]) * sum[(t0 + j) * G + g];
            }
        }
        const float rs = grouped ? 1.0f : bf16_f32(m->s[r]);
        const float b = m->bias ? m->bias[r] : 0.0f;
        for (int j = 0; j < nt; j++) y[(t0 + j) * N + r] = hsum8(acc[j]) * rs + zacc[j] + b;
    }
}

/* With AVX-512 VNNI, tokens go in the vector lanes instead: a tile of MT = 16 tokens' int16 activations is laid
   out input pair by input pair (pair p: 16 tokens x 2 inputs = one register), so one dpwssd multiplies a pair of
   weights (broadcast) into all 16 tokens and accumulates in int32; the per-group scale and zero are then applied
   once per group for the 16 tokens together. MR weight rows share each activation load. */
#define MT 16
#define MR 4
#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))

/* rows [r, r + nr) x the tile's 16 tokens -> out[i][t] (before the per-row scale and bias) */
VNNI static inline __attribute__((always_inline)) void tile_int8_vnni(
    const Mat *m, int64_t r, const int nr, const int16_t *xt, const float *dT, const float *sumT, int64_t Tpad,
    int64_t t0, float out[][MT], const int grouped) {
    const int64_t K = m->k, G = K / QB;
    __m512 facc[MR];
    int32_t wbuf[MR][QB / 2] __attribute__((aligned(64))); /* one group of each row, widened: pairs of int16 */
    for (int i = 0; i < nr; i++) facc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        for (int i = 0; i < nr; i++)
            _mm512_store_si512((void *)wbuf[i], _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                (const __m256i *)((const int8_t *)m->q + (r + i) * K + QB * g))));
        __m512i iacc[MR];
        for (int i = 0; i < nr; i++) iacc[i] = _mm512_setzero_si512();
        const int16_t *xg = xt + g * (QB / 2) * MT * 2;
        for (int p = 0; p < QB / 2; p++) {
            const __m512i xv = _mm512_load_si512((const void *)(xg + p * MT * 2));
            for (int i = 0; i < nr; i++) iacc[i] = _mm512_dpwssd_epi32(iacc[i], xv, _mm512_set1_epi32(wbuf[i][p]));
        }
        const __m512 dv = _mm512_loadu_ps(dT + g * Tpad + t0);
        const __m512 sv = _mm512_loadu_ps(sumT + g * Tpad + t0);
        for (int i = 0; i < nr; i++) {
            const uint16_t *sz = m->s + (r + i) * G * 2 + 2 * g;
            const __m512 sd = grouped ? _mm512_mul_ps(dv, _mm512_set1_ps(bf16_f32(sz[0]))) : dv;
            facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i]), sd, facc[i]);
            if (grouped) facc[i] = _mm512_fmadd_ps(sv, _mm512_set1_ps(bf16_f32(sz[1])), facc[i]);
        }
    }
    for (int i = 0; i < nr; i++) _mm512_storeu_ps(out[i], facc[i]);
}

VNNI static int matmul_int8_vnni(const Mat *m, const float *x, int64_t T, float *y, int nthreads) {
    const int64_t K = m->k, N = m->n, G = K / QB, tiles = (T + MT - 1) / MT, Tpad = tiles * MT;
    const int grouped = m->kind == KIND_INT8_GROUP;
    /* xt[tile][pair k/2][token][k & 1]; dT/sumT (G, Tpad); padded tokens are zeros */
    int16_t *xt = aligned_alloc(64, (size_t)(Tpad * K) * sizeof(int16_t));
    float *dT = calloc((size_t)(G * Tpad), sizeof(float)), *sumT = calloc((size_t)(G * Tpad), sizeof(float));
    int rc = 0;
    if (!xt || !dT || !sumT) {
        rc = 2;
        goto done;
    }
    memset(xt + (Tpad - MT) * K, 0, sizeof(int16_t) * MT * K);
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int16_t q[K];  /* one token's row, then spread into its tile's lanes */
            float d[G], sum[G];
            quantize_act16(x + t * K, (int)K, q, d, sum);
            int16_t *dst = xt + (t / MT) * MT * K + (t % MT) * 2;
            for (int64_t k = 0; k < K; k += 2) {
                dst[(k / 2) * MT * 2] = q[k];
                dst[(k / 2) * MT * 2 + 1] = q[k + 1];
            }
            for (int64_t g = 0; g < G; g++) {
                dT[g * Tpad + t] = d[g];
                sumT[g * Tpad + t] = sum[g];
            }
        }
        #pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < N; r0 += RB) {
            const int64_t r1 = r0 + RB < N ? r0 + RB : N;
            float out[MR][MT];
            for (int64_t tile = 0; tile < tiles; tile++) {
                const int64_t t0 = tile * MT;
                const int nt = (int)(T - t0 < MT ? T - t0 : MT);
                for (int64_t r = r0; r < r1; r += MR) {
                    const int nr = (int)(r1 - r < MR ? r1 - r : MR);
                    if (nr == MR)
                        tile_int8_vnni(m, r, MR, xt + t0 * K, dT, sumT, Tpad, t0, out, grouped);
                    else
                        for (int i = 0; i < nr; i++)
                            tile_int8_vnni(m, r + i, 1, xt + t0 * K, dT, sumT, Tpad, t0, out + i, grouped);
                    for (int i = 0; i < nr; i++) {
                        const float rs = grouped ? 1.0f : bf16_f32(m->s[r + i]), b = m->bias ? m->bias[r + i] : 0.0f;
                        for (int j = 0; j < nt; j++) y[(t0 + j) * N + r + i] = out[i][j] * rs + b;
                    }
                }
            }
        }
    }
done:
    free(xt);
    free(dT);
    free(sumT);
    return rc;
}

/* `vnni`: the caller found AVX-512 VNNI on this CPU; int8 products of MT tokens or more then take the
   tokens-in-lanes path (fewer would mostly multiply the padding) */
int ic_matmul(const Mat *m, const float *x, int64_t T, float *y, int nthreads, int vnni) {
    if (m->k % QB || T < 1) return 1;
    if (vnni && m->kind != KIND_INT4 && T >= MT) return matmul_int8_vnni(m, x, T, y, nthreads);
    const int64_t K = m->k, N = m->n, G = K / QB;
    const int int4 = m->kind == KIND_INT4;
    /* int4: two int8 levels per value (q, q2); int8: one int16 per value, in the same bytes */
    int8_t *q = malloc((size_t)(T * K) * 2), *q2 = q + T * K;
    float *d = malloc(sizeof(float) * T * G), *sum = malloc(sizeof(float) * T * G);
    int rc = 0;
    if (!q || !d || !sum) {
        rc = 2;
        goto done;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (int4) {
                Act a = {q + t * K, q2 + t * K, d + t * G, sum + t * G};
                quantize_act(x + t * K, (int)K, 1, &a);
            } else {
                quantize_act16(x + t * K, (int)K, (int16_t *)q + t * K, d + t * G, sum + t * G);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t r0 = 0; r0 < N; r0 += RB) {
            const int64_t r1 = r0 + RB < N ? r0 + RB : N;
            for (int64_t t0 = 0; t0 < T; t0 += TT) {
                const int nt = (int)(T - t0 < TT ? T - t0 : TT);
                if (m->kind == KIND_INT8_GROUP) {
                    rows_int8_x16(m, r0, r1, t0, nt, (const int16_t *)q, d, sum, y, 1);
                } else if (m->kind == KIND_INT8) {
                    rows_int8_x16(m, r0, r1, t0, nt, (const int16_t *)q, d, sum, y, 0);
                } else {
                    for (int j = 0; j < nt; j++) {
                        const int64_t t = t0 + j;
                        Act a = {q + t * K, q2 + t * K, d + t * G, sum + t * G};
                        for (int64_t r = r0; r < r1; r++) y[t * N + r] = row_dot(m, r, &a) + (m->bias ? m->bias[r] : 0.0f);
                    }
                }
            }
        }
    }
done:
    free(q);
    free(d);
    free(sum);
    return rc;
}
