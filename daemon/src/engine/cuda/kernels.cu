// Element-wise, normalisation, loss and optimiser kernels of the CUDA
// backend, compiled at run time by NVRTC (no nvcc at build time).
//
// Layouts are the CPU engine's: activations are row-major [rows x K*w]
// matrices (model m owns columns m*w .. (m+1)*w), parameters [K x len].
// No kernel uses atomics: every sum is taken by one thread (or one block,
// in a fixed tree) in a fixed order, so a run repeats bit for bit.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

#define NORM_EPS 1e-5f
#define GELU_C 0.7978846f
#define GELU_A 0.044715f

__device__ float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

// Activation codes: 0 ReLU, 1 GELU (tanh form), 2 SiLU, 3 tanh.
__device__ float activate(int f, float z) {
    switch (f) {
        case 0: return fmaxf(z, 0.0f);
        case 1: return 0.5f * z * (1.0f + tanhf(GELU_C * (z + GELU_A * z * z * z)));
        case 2: return z * sigmoidf_(z);
        case 3: return tanhf(z);
        // An activation the host added without its kernel: stop the launch
        // (the host gets an error) rather than compute the wrong function.
        default: __trap(); return 0.0f;
    }
}

__device__ float derivative(int f, float z) {
    switch (f) {
        case 0: return z > 0.0f ? 1.0f : 0.0f;
        case 1: {
            float t = tanhf(GELU_C * (z + GELU_A * z * z * z));
            return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * GELU_C * (1.0f + 3.0f * GELU_A * z * z);
        }
        case 2: {
            float s = sigmoidf_(z);
            return s * (1.0f + z * (1.0f - s));
        }
        case 3: {
            float t = tanhf(z);
            return 1.0f - t * t;
        }
        default: __trap(); return 0.0f;
    }
}

extern "C" __global__ void activation_forward(int f, const float* z, float* out, long long len) {
    GRID_STRIDE(i, len) out[i] = activate(f, z[i]);
}

extern "C" __global__ void activation_backward(int f, const float* z, float* delta, long long len) {
    GRID_STRIDE(i, len) delta[i] *= derivative(f, z[i]);
}

// out[r, j] += bias[j] over a [rows x cols] matrix.
extern "C" __global__ void add_bias(float* out, const float* bias, long long rows, long long cols) {
    GRID_STRIDE(i, rows * cols) out[i] += bias[i % cols];
}

extern "C" __global__ void add(const float* a, const float* b, float* out, long long len) {
    GRID_STRIDE(i, len) out[i] = a[i] + b[i];
}

extern "C" __global__ void add_into(float* acc, const float* x, long long len) {
    GRID_STRIDE(i, len) acc[i] += x[i];
}

extern "C" __global__ void multiply_into(float* acc, const float* x, long long len) {
    GRID_STRIDE(i, len) acc[i] *= x[i];
}

// sums[j] = sum over rows of m[r, j], rows in order.
extern "C" __global__ void column_sums(const float* m, float* sums, long long rows, long long cols) {
    GRID_STRIDE(j, cols) {
        float s = 0.0f;
        for (long long r = 0; r < rows; r++) s += m[r * cols + j];
        sums[j] = s;
    }
}

// One thread per (row, model) group of `width` values.
extern "C" __global__ void layer_norm_forward(const float* x, const float* gain, const float* shift, float* xhat,
                                              float* inv, float* out, long long groups, int width, int models) {
    GRID_STRIDE(g, groups) {
        const float* v = x + g * width;
        int m = (int)(g % models);
        float mean = 0.0f;
        for (int j = 0; j < width; j++) mean += v[j];
        mean /= (float)width;
        float var = 0.0f;
        for (int j = 0; j < width; j++) var += (v[j] - mean) * (v[j] - mean);
        var /= (float)width;
        float s = 1.0f / sqrtf(var + NORM_EPS);
        inv[g] = s;
        for (int j = 0; j < width; j++) {
            float h = (v[j] - mean) * s;
            xhat[g * width + j] = h;
            out[g * width + j] = h * gain[m * width + j] + shift[m * width + j];
        }
    }
}

// d_gain[j] = sum_r delta[r, j] * xhat[r, j] and d_shift[j] = sum_r delta[r, j],
// per column of [rows x cols]; run before delta is overwritten.
extern "C" __global__ void norm_parameter_grads(const float* delta, const float* xhat, float* d_gain, float* d_shift,
                                                long long rows, long long cols) {
    GRID_STRIDE(j, cols) {
        float g = 0.0f, s = 0.0f;
        for (long long r = 0; r < rows; r++) {
            float d = delta[r * cols + j];
            g += d * xhat[r * cols + j];
            s += d;
        }
        d_gain[j] = g;
        d_shift[j] = s;
    }
}

extern "C" __global__ void layer_norm_backward(float* delta, const float* gain, const float* xhat, const float* inv,
                                               long long groups, int width, int models) {
    GRID_STRIDE(g, groups) {
        float* d = delta + g * width;
        const float* h = xhat + g * width;
        const float* gm = gain + (g % models) * width;
        float sum = 0.0f, dot = 0.0f;
        for (int j = 0; j < width; j++) {
            float dx = d[j] * gm[j];
            sum += dx;
            dot += dx * h[j];
        }
        float w = (float)width;
        for (int j = 0; j < width; j++) d[j] = inv[g] / w * (w * d[j] * gm[j] - sum - h[j] * dot);
    }
}

// Batch statistics per column; stats = [mean | unbiased variance | 1/sigma], each `cols` long.
extern "C" __global__ void batch_norm_forward(const float* x, const float* gain, const float* shift, float* xhat,
                                              float* stats, float* out, long long rows, long long cols) {
    GRID_STRIDE(j, cols) {
        float mean = 0.0f;
        for (long long r = 0; r < rows; r++) mean += x[r * cols + j];
        mean /= (float)rows;
        float var = 0.0f;
        for (long long r = 0; r < rows; r++) {
            float d = x[r * cols + j] - mean;
            var += d * d;
        }
        float biased = var / (float)rows;
        float s = 1.0f / sqrtf(biased + NORM_EPS);
        stats[j] = mean;
        stats[cols + j] = rows > 1 ? var / (float)(rows - 1) : biased;
        stats[2 * cols + j] = s;
        for (long long r = 0; r < rows; r++) {
            float h = (x[r * cols + j] - mean) * s;
            xhat[r * cols + j] = h;
            out[r * cols + j] = h * gain[j] + shift[j];
        }
    }
}

extern "C" __global__ void batch_norm_backward(float* delta, const float* gain, const float* xhat, const float* stats,
                                               long long rows, long long cols) {
    GRID_STRIDE(j, cols) {
        float sum = 0.0f, dot = 0.0f;
        for (long long r = 0; r < rows; r++) {
            float dx = delta[r * cols + j] * gain[j];
            sum += dx;
            dot += dx * xhat[r * cols + j];
        }
        float n = (float)rows, inv = stats[2 * cols + j];
        for (long long r = 0; r < rows; r++) {
            long long at = r * cols + j;
            delta[at] = inv / n * (n * delta[at] * gain[j] - sum - xhat[at] * dot);
        }
    }
}

// Scoring-time BatchNorm: x * scale + offset from the running statistics.
extern "C" __global__ void batch_norm_eval(const float* x, float* out, const float* gain, const float* shift,
                                           const float* mean, const float* var, long long rows, long long cols) {
    GRID_STRIDE(i, rows * cols) {
        long long j = i % cols;
        float scale = gain[j] / sqrtf(var[j] + NORM_EPS);
        out[i] = x[i] * scale + (shift[j] - mean[j] * scale);
    }
}

// Folds one batch's statistics into the running averages of active models.
extern "C" __global__ void batch_norm_running(float* mean, float* var, const float* stats, const float* active,
                                              long long cols, int width, float momentum) {
    GRID_STRIDE(j, cols) {
        if (active[j / width] != 0.0f) {
            mean[j] = (1.0f - momentum) * mean[j] + momentum * stats[j];
            var[j] = (1.0f - momentum) * var[j] + momentum * stats[cols + j];
        }
    }
}

__device__ unsigned long long mix(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The CPU engine's dropout_keeps, bit for bit: a hash of (seed, step, op, row, column).
extern "C" __global__ void dropout_forward(const float* x, float* out, float* mask, long long rows, int width,
                                           int models, unsigned long long seed, unsigned long long step,
                                           unsigned long long op, float p, float keep) {
    GRID_STRIDE(i, rows * width) {
        long long r = i / width;
        int c = (int)(i % width);
        unsigned long long h = mix(mix(mix(seed ^ mix(step)) ^ ((op << 32) | (unsigned long long)c)) ^
                                   (unsigned long long)r);
        float v = (float)(h >> 40) * (1.0f / 16777216.0f) >= p ? keep : 0.0f;
        long long wide = (long long)width * models;
        for (int m = 0; m < models; m++) {
            long long at = r * wide + (long long)m * width + c;
            mask[at] = v;
            out[at] = x[at] * v;
        }
    }
}

// One embedding column of every model: emb[r, m*e + offset + d] = table_m[code, d].
extern "C" __global__ void gather_embedding(const float* table, const unsigned int* codes, float* emb, long long rows,
                                            int models, int code_cols, int c, int vocabulary, int dim, int e,
                                            int offset) {
    GRID_STRIDE(i, rows * models * dim) {
        long long r = i / ((long long)models * dim);
        int m = (int)((i / dim) % models), d = (int)(i % dim);
        unsigned int code = min(codes[r * code_cols + c], (unsigned int)vocabulary);
        emb[r * models * e + (long long)m * e + offset + d] =
            table[(long long)m * (vocabulary + 1) * dim + (long long)code * dim + d];
    }
}

// The embedding table's gradient, rows in order, one thread per (model, component);
// the row for unseen values stays zero.
extern "C" __global__ void scatter_embedding(float* grad, const unsigned int* codes, const float* d_emb,
                                             long long rows, int models, int code_cols, int c, int vocabulary,
                                             int dim, int e, int offset) {
    GRID_STRIDE(i, (long long)models * dim) {
        int m = (int)(i / dim), d = (int)(i % dim);
        float* table = grad + (long long)m * (vocabulary + 1) * dim;
        for (int v = 0; v <= vocabulary; v++) table[(long long)v * dim + d] = 0.0f;
        for (long long r = 0; r < rows; r++) {
            unsigned int code = codes[r * code_cols + c];
            if (code < (unsigned int)vocabulary)
                table[(long long)code * dim + d] += d_emb[r * models * e + (long long)m * e + offset + d];
        }
    }
}

// Losses write, per (row, model), the weighted loss and d(loss)/d(logits)
// already divided by the batch's denominator. Inactive models get zeros.
// `smoothing` is label smoothing ε: the target y becomes y(1 - ε) + ε/2.
extern "C" __global__ void binary_loss(const float* logits, const float* y, float* grad, float* row_loss,
                                       const float* active, long long rows, int models, float w0, float w1,
                                       float smoothing, float inv_denominator) {
    GRID_STRIDE(i, rows * models) {
        int m = (int)(i % models);
        if (active[m] == 0.0f) {
            grad[i] = 0.0f;
            row_loss[i] = 0.0f;
            continue;
        }
        float z = logits[i], label = y[i / models];
        float w = label > 0.5f ? w1 : w0;
        float t = label * (1.0f - smoothing) + 0.5f * smoothing;
        float e = expf(-fabsf(z));
        float p = z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        row_loss[i] = w * (fmaxf(z, 0.0f) - z * t + log1pf(e));
        grad[i] = (p - t) * w * inv_denominator;
    }
}

// `weights` holds one weight per class, or is ignored when `weighted` is 0.
// With label smoothing ε > 0 the row's loss is PyTorch's
// (1 - ε)·w_k·(-ln p_k) + (ε/C)·Σ_c w_c·(-ln p_c), as in the CPU engine.
extern "C" __global__ void multiclass_loss(const float* logits, const float* y, float* grad, float* row_loss,
                                           const float* active, long long rows, int models, int classes,
                                           const float* weights, int weighted, float smoothing,
                                           float inv_denominator) {
    GRID_STRIDE(i, rows * models) {
        int m = (int)(i % models);
        const float* z = logits + i * classes;
        float* g = grad + i * classes;
        if (active[m] == 0.0f) {
            for (int c = 0; c < classes; c++) g[c] = 0.0f;
            row_loss[i] = 0.0f;
            continue;
        }
        int k = (int)y[i / models];
        float w = weighted ? weights[k] : 1.0f;
        float max = z[0];
        for (int c = 1; c < classes; c++) max = fmaxf(max, z[c]);
        float sum = 0.0f;
        for (int c = 0; c < classes; c++) {
            g[c] = expf(z[c] - max);
            sum += g[c];
        }
        if (smoothing > 0.0f) {
            float spread = smoothing / (float)classes, on_target = (1.0f - smoothing) * w;
            float total_weight = 0.0f;
            for (int c = 0; c < classes; c++) total_weight += weighted ? weights[c] : 1.0f;
            float scale = on_target + spread * total_weight, ln_sum = logf(sum), loss = 0.0f;
            for (int c = 0; c < classes; c++) {
                float here = (c == k ? on_target : 0.0f) + spread * (weighted ? weights[c] : 1.0f);
                loss += here * -(z[c] - max - ln_sum);
                g[c] = (scale * (g[c] / sum) - here) * inv_denominator;
            }
            row_loss[i] = loss;
            continue;
        }
        for (int c = 0; c < classes; c++) g[c] /= sum;
        row_loss[i] = -w * logf(fmaxf(g[k], 1.17549435e-38f));
        g[k] -= 1.0f;
        for (int c = 0; c < classes; c++) g[c] *= w * inv_denominator;
    }
}

// Squared error (huber = 0) or Huber with threshold `huber`.
extern "C" __global__ void regression_loss(const float* logits, const float* y, float* grad, float* row_loss,
                                           const float* active, long long rows, int models, float huber,
                                           float inv_denominator) {
    GRID_STRIDE(i, rows * models) {
        int m = (int)(i % models);
        if (active[m] == 0.0f) {
            grad[i] = 0.0f;
            row_loss[i] = 0.0f;
            continue;
        }
        float d = logits[i] - y[i / models];
        if (huber > 0.0f && fabsf(d) > huber) {
            row_loss[i] = huber * (fabsf(d) - 0.5f * huber);
            grad[i] = huber * (d > 0.0f ? 1.0f : -1.0f) * inv_denominator;
        } else if (huber > 0.0f) {
            row_loss[i] = 0.5f * d * d;
            grad[i] = d * inv_denominator;
        } else {
            row_loss[i] = d * d;
            grad[i] = 2.0f * d * inv_denominator;
        }
    }
}

// sums[m] += scale * sum over rows of row_loss[r, m], rows in order.
extern "C" __global__ void sum_losses(const float* row_loss, double* sums, long long rows, int models, double scale) {
    GRID_STRIDE(m, models) {
        double s = 0.0;
        for (long long r = 0; r < rows; r++) s += (double)row_loss[r * models + m];
        sums[m] += s * scale;
    }
}

#define NORM_THREADS 256

// norms[m] += sum of squares of model m's `len` gradients; one block per model,
// summed in a fixed tree.
extern "C" __global__ void squared_norms(const float* grad, double* norms, long long len) {
    __shared__ double part[NORM_THREADS];
    int m = blockIdx.x;
    const float* g = grad + (long long)m * len;
    double s = 0.0;
    for (long long i = threadIdx.x; i < len; i += NORM_THREADS) s += (double)g[i] * (double)g[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int half = NORM_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) norms[m] += part[0];
}

// Per-model settings, SETTINGS floats each: learning rate, weight decay,
// momentum, clip norm, Adam's bias corrections 1 - beta^t, and active (0/1).
#define SETTINGS 8

// One optimiser step over a [K x len] parameter tensor. kind: 0 Adam, 1 AdamW, 2 SGD.
extern "C" __global__ void optimizer_step(float* param, const float* grad, float* first, float* second,
                                          long long len, int models, const float* settings, const double* norms,
                                          int kind, int decays, float beta1, float beta2, float eps) {
    GRID_STRIDE(i, len * models) {
        const float* s = settings + (i / len) * SETTINGS;
        if (s[6] == 0.0f) continue;
        float lr = s[0], wd = decays ? s[1] : 0.0f, momentum = s[2], clip = s[3], c1 = s[4], c2 = s[5];
        float scale = 1.0f;
        if (clip > 0.0f) {
            float norm = (float)sqrt(norms[i / len]);
            if (isfinite(norm) && norm > clip) scale = clip / norm;
        }
        float p = param[i], g = grad[i] * scale;
        if (kind == 0) {
            g += wd * p;
            first[i] = beta1 * first[i] + (1.0f - beta1) * g;
            second[i] = beta2 * second[i] + (1.0f - beta2) * g * g;
            param[i] = p - lr * (first[i] / c1) / (sqrtf(second[i] / c2) + eps);
        } else if (kind == 1) {
            first[i] = beta1 * first[i] + (1.0f - beta1) * g;
            second[i] = beta2 * second[i] + (1.0f - beta2) * g * g;
            param[i] = p * (1.0f - lr * wd) - lr * (first[i] / c1) / (sqrtf(second[i] / c2) + eps);
        } else {
            first[i] = momentum * first[i] + g + wd * p;
            param[i] = p - lr * first[i];
        }
    }
}
