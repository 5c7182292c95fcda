// Crop-resize of K boxes per image from a ragged batch of full-resolution uint8 RGB images, and (section
// "the global view" below) each image's global view, in one launch each.
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

// -- the global view -------------------------------------------------------------------------------------
//
// scanner.model.preprocess.global_views for a ragged batch: the central square (side m = min(H, W), offset
// ((H-m)/2, (W-m)/2)) of each image resized to S x S by torch's antialiased bilinear filter
// (F.interpolate(mode="bilinear", align_corners=False, antialias=True)) of the values / 255, clamped to
// [0, 1]; out (B, 3, S, S) float32. Per axis, output index i of S from m inputs, in the types torch's CPU
// kernel computes its weights in:
//   scale = float(m) / S;  support = scale >= 1 ? scale : 1;  invscale = scale >= 1 ? float(1.0 / scale) : 1
//   center = float(scale * (i + 0.5))                                    (the product in double)
//   lo = max(trunc(double(center - support) + 0.5), 0);  hi = min(trunc(double(center + support) + 0.5), m)
//   w_j = tri(float((double(float(lo + j) - center) + 0.5) * invscale)),  tri(x) = max(0, 1 - |x|),  j < hi - lo
//   w_j = w_j / sum(w) when the sum (float, in order) is not 0
// Value, rows first as torch's separable passes run: h(y) = sum_j p(y, lo_x + j) * wx_j, then
// v = sum_j h(lo_y + j) * wy_j, each sum in float from its first product on, no FMA; p = float(u8) / 255;
// out = min(max(v, 0), 1). At m == S the weights are (1, 0) and the view is p itself, as the reference's.
// torch's own CPU kernel fuses some of these sums into FMAs, depending on the size: on random images the
// view is within 2.4e-7 of global_views on the CPU (tests/test_kernels.py allows 1e-6), and bit-identical
// between this kernel on a GPU and its host build.

// The weight of input k before normalisation.
SK_FN float view_weight(long long k, float center, float invscale) {
    float x = SK_D2F(SK_DMUL(SK_DADD((double)SK_FSUB((float)k, center), 0.5), (double)invscale));
    x = x < 0.0f ? -x : x;
    return x < 1.0f ? SK_FSUB(1.0f, x) : 0.0f;
}

// Output index i of S along an axis of m inputs: the first input, how many, and the filter's centre,
// inverse scale and weight sum.
SK_FN void view_axis(long long m, int S, int i, long long* lo, int* n, float* center, float* invscale,
                     float* total) {
    const float scale = SK_FDIV((float)m, (float)S);
    const float support = scale >= 1.0f ? scale : 1.0f;
    *invscale = scale >= 1.0f ? SK_D2F(SK_DDIV(1.0, (double)scale)) : 1.0f;
    *center = SK_D2F(SK_DMUL((double)scale, SK_DADD((double)i, 0.5)));
    long long l = (long long)SK_DADD((double)SK_FSUB(*center, support), 0.5);
    long long h = (long long)SK_DADD((double)SK_FADD(*center, support), 0.5);
    l = l > 0 ? l : 0;
    h = h < m ? h : m;
    *lo = l;
    *n = h > l ? (int)(h - l) : 0;
    float t = 0.0f;
    for (int j = 0; j < *n; ++j) t = SK_FADD(t, view_weight(l + j, *center, *invscale));
    *total = t;
}

SK_FN float view_normalised(float w, float total) { return total != 0.0f ? SK_FDIV(w, total) : w; }

// Output pixel `pix` (row-major in S x S) of image b's view, all three channels.
SK_FN void view_pixel(const long long* table, float* out, int S, long long b, int pix) {
    const long long* t = table + 6 * b;
    const unsigned char* img = (const unsigned char*)t[0];
    const long long height = t[1], width = t[2], sy = t[3], sx = t[4], sc = t[5];
    const long long m = height < width ? height : width;
    const unsigned char* square = img + ((height - m) / 2) * sy + ((width - m) / 2) * sx;
    long long ly, lx;
    int ny, nx;
    float cy, cx, iy, ix, ty, tx;
    view_axis(m, S, pix / S, &ly, &ny, &cy, &iy, &ty);
    view_axis(m, S, pix % S, &lx, &nx, &cx, &ix, &tx);
    float v[3] = {0.0f, 0.0f, 0.0f};
    for (int jy = 0; jy < ny; ++jy) {
        const float wy = view_normalised(view_weight(ly + jy, cy, iy), ty);
        const unsigned char* row = square + (ly + jy) * sy;
        float h[3] = {0.0f, 0.0f, 0.0f};
        for (int jx = 0; jx < nx; ++jx) {
            const float wx = view_normalised(view_weight(lx + jx, cx, ix), tx);
            const unsigned char* p = row + (lx + jx) * sx;
            for (int c = 0; c < 3; ++c) {
                const float term = SK_FMUL(SK_FDIV((float)p[c * sc], 255.0f), wx);
                h[c] = jx == 0 ? term : SK_FADD(h[c], term);
            }
        }
        for (int c = 0; c < 3; ++c) v[c] = jy == 0 ? SK_FMUL(h[c], wy) : SK_FADD(v[c], SK_FMUL(h[c], wy));
    }
    const long long plane = (long long)S * S;
    for (int c = 0; c < 3; ++c) {
        const float clamped = v[c] < 0.0f ? 0.0f : (v[c] > 1.0f ? 1.0f : v[c]);
        out[(b * 3 + c) * plane + pix] = clamped;
    }
}

#ifdef __CUDACC__
extern "C" __global__ void global_view_f32(const long long* table, float* out, int S) {
    const int pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= S * S) return;
    view_pixel(table, out, S, (long long)blockIdx.z, pix);
}

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
