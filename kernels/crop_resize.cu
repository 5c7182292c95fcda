// Crop-resize of K boxes per image from a ragged batch of full-resolution uint8 RGB images.
//
// Computes exactly what scanner/model/crop_resize.py (the reference) computes, then the scaling the model
// applies, in one pass: out[b, k, c] = (bilinear(image_b[c], box_bk) / 255 - mean[c]) / std[c].
// With mean = 0 and std = 1 that is the model's [0, 1] patch (crop_resize(...) / 255), exactly.
//
// Per axis (align_corners=True), for output index j of S, box [start, end):
//   step = ((end - start) - 1) / max(S - 1, 1)         float64
//   pos  = start + step * j                            float64
//   lo   = min(floor(pos), end - 1);  hi = min(lo + 1, end - 1);  frac = float32(pos - lo)
// Value (float32, the reference's order of operations):
//   top = p(lo_y, lo_x) * (1 - fx) + p(lo_y, hi_x) * fx
//   bot = p(hi_y, lo_x) * (1 - fx) + p(hi_y, hi_x) * fx
//   v   = top * (1 - fy) + bot * fy;   out = (v / 255 - mean[c]) / std[c]
// Every operation is one IEEE operation with round-to-nearest-even (__dmul_rn, __fadd_rn, ...; NVRTC
// runs with --fmad=false, --prec-div=true, --ftz=false): the float32 output is bit-identical to the
// reference computed by torch on the CPU, and the float16 / bfloat16 outputs are its round-to-nearest-
// even conversion. (torch on CUDA divides by a scalar as a multiplication by its reciprocal, so a
// reference run there can differ in the last bit.)
//
// Layout: `table` is (B, 6) int64 per image: data pointer, H, W, and the element strides of y, x and
// channel, so an HWC buffer (strides W*3, 3, 1) and a CHW one (W, 1, H*W) are both read in place;
// images are never padded. boxes: (B, K, 4) int64 [x0, y0, x1, y1], half-open, inside the image
// (indices are also clamped into the image, so a bad box reads wrong pixels, never out of bounds).
// out: (B, K, 3, S, S) float32 / float16 / bfloat16, contiguous. Grid (ceil(S*S / block), K, B).
//
// The same source compiles as plain C++ (no __CUDACC__): tests/test_kernels.py runs that build on
// CPUs through crop_pixel below, the kernels' whole per-thread body.

#ifdef __CUDACC__
#define SK_FN __device__ __forceinline__
#define SK_DADD(a, b) __dadd_rn((a), (b))
#define SK_DMUL(a, b) __dmul_rn((a), (b))
#define SK_DDIV(a, b) __ddiv_rn((a), (b))
#define SK_FADD(a, b) __fadd_rn((a), (b))
#define SK_FSUB(a, b) __fsub_rn((a), (b))
#define SK_FMUL(a, b) __fmul_rn((a), (b))
#define SK_FDIV(a, b) __fdiv_rn((a), (b))
#define SK_D2F(a) __double2float_rn(a)
SK_FN unsigned int sk_float_bits(float f) { return __float_as_uint(f); }
#else
#include <cmath>
#include <cstring>
#define SK_FN static inline
#define SK_DADD(a, b) ((a) + (b))
#define SK_DMUL(a, b) ((a) * (b))
#define SK_DDIV(a, b) ((a) / (b))
#define SK_FADD(a, b) ((a) + (b))
#define SK_FSUB(a, b) ((a) - (b))
#define SK_FMUL(a, b) ((a) * (b))
#define SK_FDIV(a, b) ((a) / (b))
#define SK_D2F(a) ((float)(a))
SK_FN unsigned int sk_float_bits(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}
#endif

// Passed by value; kernels/__init__.py mirrors it as a ctypes.Structure.
struct CropNorm {
    float mean[3];
    float std[3];
};

struct Half { unsigned short bits; };
struct BFloat16 { unsigned short bits; };

// float32 -> float16, round to nearest even (as torch's .half()); overflow to inf, NaN stays NaN.
SK_FN unsigned short sk_float_to_half(float f) {
    const unsigned int x = sk_float_bits(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  // NaN
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 (and inf) -> inf
    if (ax >= 0x38800000u) {  // normal: rebias the exponent, round 23 -> 10 mantissa bits
        unsigned int r = ax - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return (unsigned short)(sign | (r >> 13));
    }
    if (ax <= 0x33000000u) return (unsigned short)sign;  // <= 2**-25: rounds to zero
    // Subnormal: value / 2**-24 = significand >> (126 - exponent), rounded to nearest even.
    const unsigned int e = ax >> 23;
    const unsigned int m = (ax & 0x7fffffu) | 0x800000u;
    const unsigned int shift = 126u - e;
    unsigned int q = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
}

// float32 -> bfloat16, round to nearest even (as torch's .bfloat16()).
SK_FN unsigned short sk_float_to_bf16(float f) {
    const unsigned int x = sk_float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);  // quiet NaN
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

SK_FN void sk_store(float* p, float v) { *p = v; }
SK_FN void sk_store(Half* p, float v) { p->bits = sk_float_to_half(v); }
SK_FN void sk_store(BFloat16* p, float v) { p->bits = sk_float_to_bf16(v); }

SK_FN long long sk_clamp(long long v, long long lo, long long hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Sample position j of S along one axis of the box [start, end) in an image of `size` pixels.
SK_FN void sk_axis(long long start, long long end, int S, int j, long long size, long long* lo, long long* hi,
                   float* frac) {
    const double step = SK_DDIV(SK_DADD((double)(end - start), -1.0), (double)(S > 1 ? S - 1 : 1));
    const double pos = SK_DADD((double)start, SK_DMUL(step, (double)j));
    long long l = (long long)floor(pos);
    l = l < end - 1 ? l : end - 1;
    const long long h = l + 1 < end - 1 ? l + 1 : end - 1;
    *frac = SK_D2F(SK_DADD(pos, -(double)l));
    *lo = sk_clamp(l, 0, size - 1);  // no-ops for boxes inside the image; memory safety otherwise
    *hi = sk_clamp(h, 0, size - 1);
}

// Output pixel `pix` (row-major in S x S) of box k of image b, all three channels.
template <typename OUT>
SK_FN void crop_pixel(const long long* table, const long long* boxes, OUT* out, int K, int S, const CropNorm& norm,
                      long long b, int k, int pix) {
    const long long* t = table + 6 * b;
    const unsigned char* img = (const unsigned char*)t[0];
    const long long height = t[1], width = t[2], sy = t[3], sx = t[4], sc = t[5];
    const long long* box = boxes + 4 * (b * K + k);
    long long y0, y1, x0, x1;
    float fy, fx;
    sk_axis(box[1], box[3], S, pix / S, height, &y0, &y1, &fy);
    sk_axis(box[0], box[2], S, pix % S, width, &x0, &x1, &fx);
    const float gx = SK_FSUB(1.0f, fx), gy = SK_FSUB(1.0f, fy);
    const long long plane = (long long)S * S;
    OUT* o = out + (b * K + k) * 3 * plane + pix;
    for (int c = 0; c < 3; ++c) {
        const unsigned char* p = img + c * sc;
        const float p00 = (float)p[y0 * sy + x0 * sx], p01 = (float)p[y0 * sy + x1 * sx];
        const float p10 = (float)p[y1 * sy + x0 * sx], p11 = (float)p[y1 * sy + x1 * sx];
        const float top = SK_FADD(SK_FMUL(p00, gx), SK_FMUL(p01, fx));
        const float bot = SK_FADD(SK_FMUL(p10, gx), SK_FMUL(p11, fx));
        const float v = SK_FADD(SK_FMUL(top, gy), SK_FMUL(bot, fy));
        sk_store(o + c * plane, SK_FDIV(SK_FSUB(SK_FDIV(v, 255.0f), norm.mean[c]), norm.std[c]));
    }
}

#ifdef __CUDACC__
template <typename OUT>
SK_FN void crop_block(const long long* table, const long long* boxes, OUT* out, int K, int S, const CropNorm& norm) {
    const int pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= S * S) return;
    crop_pixel(table, boxes, out, K, S, norm, (long long)blockIdx.z, (int)blockIdx.y, pix);
}

extern "C" __global__ void crop_resize_f32(const long long* table, const long long* boxes, float* out, int K, int S,
                                           CropNorm norm) {
    crop_block(table, boxes, out, K, S, norm);
}
extern "C" __global__ void crop_resize_f16(const long long* table, const long long* boxes, Half* out, int K, int S,
                                           CropNorm norm) {
    crop_block(table, boxes, out, K, S, norm);
}
extern "C" __global__ void crop_resize_bf16(const long long* table, const long long* boxes, BFloat16* out, int K,
                                            int S, CropNorm norm) {
    crop_block(table, boxes, out, K, S, norm);
}
#endif
