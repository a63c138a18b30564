// nms_kernels.cu: greedy hard / soft (gaussian, linear) NMS for a whole batch in one launch.
//
// Where this sits in the flow
// ---------------------------
//   model -> raw outputs -> decode -> [eval.batched_nms: select candidates, pad into groups]
//         -> THIS KERNEL (the greedy picks of every group at once)
//         -> [eval.batched_nms: merge the picks of each image, keep the best max_output_size]
//         -> undo letterbox -> COCO json -> pycocotools
//
// eval.py loads this file with cupy.RawModule (only when the tensors are on a CUDA device) and
// runs exactly the same algorithm in plain torch on the CPU (eval._greedy_nms_torch), so the
// kernel and its twin agree pick for pick, up to the last bits of the gaussian's exp (CUDA's
// expf and torch's exp are different approximations; the IoU itself rounds identically, see
// --fmad=false in eval.py). Keep them in step when changing either one.
//
// What a "group" is
// -----------------
// NMS only ever compares candidates that may suppress each other:
//   - mode "global":    all candidates of one image form one group (classes suppress each other);
//   - mode "per_class": the candidates of one (image, class) pair form one group.
// eval.py pads every group to the same length K and hands us, for G groups:
//   scores [G, K] float32  working scores; a padded slot holds -inf. The kernel overwrites them.
//   boxes  [G, K, 4] float32 xyxy pixels, candidate k of group g at boxes[(g * K + k) * 4 + 0..3].
// Inside a group, candidates are ordered by initial score (descending, ties by lower (prior,
// class) index), and every tie below is broken by the LOWER position, the same as torch.argmax.
//
// The algorithm of one group (greedy; soft-NMS, Bodla et al. 2017, with hard NMS as a special case)
// ---------------------------------------------------------------------------------------------
//   alive = score >= score_threshold
//   repeat at most max_output_size times:
//       pick the alive candidate with the largest current score (ties: lower position);
//       if none is alive: stop;
//       write (position, current score) as the next output of the group; mark it not alive;
//       for every other alive candidate, with iou = IoU(picked box, its box):
//           hard:     iou > thr  -> not alive
//           gaussian: score *= exp(-iou^2 / sigma)
//           linear:   iou > thr  -> score *= (1 - iou)
//           then score < score_threshold -> not alive.
// The picked scores never increase (every decay factor is <= 1), so the first max_output_size
// picks of each group are enough for the best max_output_size of the whole image.
//
// Who owns what
// -------------
//   one BLOCK  = one group. Groups never interact, so they need no synchronisation with each
//                other, and a block is the largest unit whose threads can synchronise cheaply
//                (__syncthreads) and share fast on-chip memory for the argmax.
//   one THREAD = the candidates k = threadIdx.x, threadIdx.x + blockDim.x, ... of its group
//                (a block-stride loop). Neighbouring threads touch neighbouring k, so each
//                warp's reads of scores[g, k] fall in consecutive addresses (coalesced).
// The scores and boxes stay in global memory rather than shared memory because K is not bounded
// (nms_topk = -1 keeps every candidate): shared memory holds only the per-step argmax scratch
// (one (score, position) pair per thread) and the picked box, which every thread then reads.
//
// The step loop over picks is inherently sequential (pick i decides what pick i + 1 is); the
// parallelism is across the K candidates of a group inside one step, and across groups.
//
// The file includes no headers, so NVRTC (cupy.RawModule) and `nvcc -c` both compile it as is.

// Threads per block. eval.py compiles with -DNMS_THREADS=<its eval.NMS_THREADS> and launches
// exactly that many: the shared arrays and the tree reduction below are sized by it (a power of
// two), so a launch with another count would read slots no thread wrote.
#ifndef NMS_THREADS
#define NMS_THREADS 256
#endif

#define NMS_HARD 0
#define NMS_GAUSSIAN 1
#define NMS_LINEAR 2

// IoU of two xyxy boxes, written in the same order of operations as eval._box_iou_one_to_many so that
// the CPU twin produces the same float32 value. An empty union gives 0.
__device__ __forceinline__ float box_iou(float ax1, float ay1, float ax2, float ay2,
                                         float bx1, float by1, float bx2, float by2) {
    float iw = fmaxf(fminf(ax2, bx2) - fmaxf(ax1, bx1), 0.0f);
    float ih = fmaxf(fminf(ay2, by2) - fmaxf(ay1, by1), 0.0f);
    float inter = iw * ih;
    float area_a = (ax2 - ax1) * (ay2 - ay1);
    float area_b = (bx2 - bx1) * (by2 - by1);
    float uni = area_a + area_b - inter;
    return uni > 0.0f ? inter / uni : 0.0f;
}

// Does (score a, position ia) beat (score b, position ib)? Higher score wins; a tie goes to the
// lower position, which is what torch.argmax returns on the CPU side.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
    return a > b || (a == b && ia < ib);
}

extern "C" __global__ void nms_greedy_kernel(
    float* __restrict__ scores,          // [G, K] working scores, -inf = padding; modified in place
    const float* __restrict__ boxes,     // [G, K, 4] xyxy
    int* __restrict__ keep_pos,          // [G, max_output_size] position in the group, -1 = none
    float* __restrict__ keep_score,      // [G, max_output_size] score when picked, 0 = none
    const int K,
    const int max_output_size,
    const float score_threshold,
    const float iou_or_sigma,            // IoU threshold for hard / linear, sigma for gaussian
    const int method) {                  // NMS_HARD, NMS_GAUSSIAN or NMS_LINEAR
    // -inf without math.h (NVRTC has no standard headers).
    const float NEG_INF = __int_as_float(0xff800000);

    __shared__ float red_score[NMS_THREADS];  // argmax scratch: one slot per thread
    __shared__ int red_pos[NMS_THREADS];
    __shared__ float picked[4];               // the picked box, read by every thread

    const int g = blockIdx.x;    // this block's group
    const int t = threadIdx.x;   // this thread's first candidate in the group
    float* s = scores + (long long)g * K;
    const float* b = boxes + (long long)g * K * 4;

    // Scores below the threshold are dead from the start (the same rule as after every decay).
    for (int k = t; k < K; k += NMS_THREADS) {
        if (!(s[k] >= score_threshold)) s[k] = NEG_INF;
    }
    __syncthreads();

    int n_out = 0;
    for (; n_out < max_output_size; ++n_out) {
        // 1) every thread finds the best of its own candidates ...
        float best = NEG_INF;
        int best_pos = -1;
        for (int k = t; k < K; k += NMS_THREADS) {
            // k only grows inside this loop, so a strict '>' keeps the lower position on a tie.
            if (s[k] > best) {
                best = s[k];
                best_pos = k;
            }
        }
        red_score[t] = best;
        red_pos[t] = best_pos;
        __syncthreads();
        // 2) ... and a tree reduction in shared memory finds the best of the block: at each round
        // the lower half of the threads compares its slot with the slot `stride` above it.
        for (int stride = NMS_THREADS / 2; stride > 0; stride >>= 1) {
            if (t < stride) {
                int j = t + stride;
                int pj = red_pos[j];
                if (pj >= 0 && (red_pos[t] < 0 || better(red_score[j], pj, red_score[t], red_pos[t]))) {
                    red_score[t] = red_score[j];
                    red_pos[t] = pj;
                }
            }
            __syncthreads();
        }
        const int p = red_pos[0];  // every thread reads the same winner
        if (p < 0) break;          // nothing alive: this group is done (the same for all threads)

        // 3) one thread records the pick and publishes its box.
        if (t == 0) {
            keep_pos[g * max_output_size + n_out] = p;
            keep_score[g * max_output_size + n_out] = red_score[0];
            s[p] = NEG_INF;
            picked[0] = b[p * 4 + 0];
            picked[1] = b[p * 4 + 1];
            picked[2] = b[p * 4 + 2];
            picked[3] = b[p * 4 + 3];
        }
        __syncthreads();

        // 4) every thread decays its own alive candidates against the picked box.
        for (int k = t; k < K; k += NMS_THREADS) {
            float sk = s[k];
            if (sk == NEG_INF) continue;
            float iou = box_iou(picked[0], picked[1], picked[2], picked[3],
                                b[k * 4 + 0], b[k * 4 + 1], b[k * 4 + 2], b[k * 4 + 3]);
            if (method == NMS_HARD) {
                if (iou > iou_or_sigma) sk = NEG_INF;
            } else if (method == NMS_GAUSSIAN) {
                sk = sk * expf(-(iou * iou) / iou_or_sigma);
            } else {  // NMS_LINEAR
                if (iou > iou_or_sigma) sk = sk * (1.0f - iou);
            }
            s[k] = sk >= score_threshold ? sk : NEG_INF;
        }
        // The next step's argmax reads red_* and s[]: wait until everybody has finished here.
        __syncthreads();
    }

    // Unused output slots: position -1, score 0 (the host pre-fills nothing).
    for (int i = n_out + t; i < max_output_size; i += NMS_THREADS) {
        keep_pos[g * max_output_size + i] = -1;
        keep_score[g * max_output_size + i] = 0.0f;
    }
}
