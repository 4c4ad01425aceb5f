// The fused CPU kernel of rascaline_e3nn (kernel="fused").
//
// - to_irreps / from_irreps: every block's values to (or from) the flat
//   [rows, irreps.dim] tensor in one pass, with the change of basis folded in; each
//   is the other's backward.
// - to_irreps_map / samples_map / from_irreps_map: the common case of the modules,
//   metadata included, reading (or building) metatensor-torch TensorMaps in C++;
//   anything else is handed back to the TorchScript code, which handles or names it.
//
// The layout (which block goes to which columns) is planned once in Python
// (Layout.fused_tables); per call, only rows are ordered here.
//
// Tables, per planned block t (meta[3 t : 3 t + 3]): l, row group, and the start
// of its properties in `columns`, which holds two numbers per property: the column
// of its m = -l component in a row, and the column step from one m to the next
// (1 for mul_ir, the segment's multiplicity for ir_mul). A block's properties end
// where the next block's start (the last block's at the end of `columns`).
// position[k]: the flat row of the k-th row of the groups taken in order.
// basis: [L + 1, 2L + 1, 2L + 1] float64 matrices D_l (x_e3nn = D_l x_featomic),
// or None for the identity (featomic basis).

#include <torch/script.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/Parallel.h>

#include <metatensor/torch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// how the properties of a block lie in a row
enum Run {
    GENERIC = 0, // any columns
    MUL_IR = 1,  // property p, component m at first + p (2l + 1) + m
    IR_MUL = 2,  // property p, component m at first + m step + p
};

struct Block {
    int64_t slot;   // index in the value list
    int64_t l;
    int64_t group;
    const int64_t* columns; // (first column, step) per property
    int64_t n_props;
    Run run;
    int64_t first;
    int64_t step;
};

// non-zero entries of D_l: (row, column, value)
template <typename T>
struct Sparse {
    std::vector<int64_t> ptr;  // per output m, range in idx/val
    std::vector<int64_t> idx;
    std::vector<T> val;
};

struct Plan {
    std::vector<Block> blocks;              // present blocks, in value order
    std::vector<std::vector<int64_t>> by_group; // indices in `blocks`
    std::vector<int64_t> group_start;       // first position of each group
    std::vector<int64_t> group_rows;
    int64_t max_k = 1;
    int64_t max_props = 0;
};

Plan make_plan(
    int64_t n_values,
    c10::IntArrayRef slots,
    c10::IntArrayRef group_rows,
    c10::IntArrayRef meta,
    c10::IntArrayRef columns,
    int64_t n_positions,
    int64_t dim
) {
    TORCH_CHECK(meta.size() % 3 == 0, "rascaline_e3nn: malformed block table");
    auto n_blocks = static_cast<int64_t>(meta.size() / 3);
    auto n_groups = static_cast<int64_t>(group_rows.size());
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == n_values,
        "rascaline_e3nn: ", n_values, " values for ", slots.size(), " slots");
    Plan plan;
    plan.group_rows = group_rows.vec();
    plan.by_group.resize(n_groups);
    int64_t total = 0;
    for (auto n: group_rows) {
        TORCH_CHECK(n >= 0, "rascaline_e3nn: negative row count");
        plan.group_start.push_back(total);
        total += n;
    }
    TORCH_CHECK(total == n_positions,
        "rascaline_e3nn: ", n_positions, " positions for ", total, " group rows");
    std::vector<bool> seen(n_blocks, false);
    for (int64_t i = 0; i < n_values; i++) {
        auto t = slots[i];
        TORCH_CHECK(t >= 0 && t < n_blocks, "rascaline_e3nn: slot ", t, " out of range");
        TORCH_CHECK(!seen[t], "rascaline_e3nn: slot ", t, " given twice");
        seen[t] = true;
        Block b;
        b.slot = i;
        b.l = meta[3 * t];
        b.group = meta[3 * t + 1];
        auto start = meta[3 * t + 2];
        auto stop = t + 1 < n_blocks ? meta[3 * (t + 1) + 2] : static_cast<int64_t>(columns.size());
        TORCH_CHECK(b.l >= 0 && b.group >= 0 && b.group < n_groups, "rascaline_e3nn: bad block table");
        TORCH_CHECK(0 <= start && start <= stop && stop <= static_cast<int64_t>(columns.size())
            && start % 2 == 0 && stop % 2 == 0, "rascaline_e3nn: bad column table");
        b.columns = columns.data() + start;
        b.n_props = (stop - start) / 2;
        for (int64_t p = 0; p < b.n_props; p++) {
            auto first = b.columns[2 * p];
            auto step = b.columns[2 * p + 1];
            TORCH_CHECK(first >= 0 && step >= 1 && first + 2 * b.l * step < dim,
                "rascaline_e3nn: block ", t, " does not fit in a row of ", dim);
        }
        auto K = 2 * b.l + 1;
        b.run = GENERIC;
        b.first = b.n_props > 0 ? b.columns[0] : 0;
        b.step = b.n_props > 0 ? b.columns[1] : 1;
        bool mul_ir = b.step == 1, ir_mul = true;
        for (int64_t p = 0; p < b.n_props; p++) {
            mul_ir = mul_ir && b.columns[2 * p] == b.first + p * K && b.columns[2 * p + 1] == 1;
            ir_mul = ir_mul && b.columns[2 * p] == b.first + p && b.columns[2 * p + 1] == b.step;
        }
        if (mul_ir) {
            b.run = MUL_IR;
        } else if (ir_mul && b.step >= b.n_props) {
            b.run = IR_MUL;
        }
        plan.max_k = std::max(plan.max_k, 2 * b.l + 1);
        plan.max_props = std::max(plan.max_props, b.n_props);
        plan.by_group[b.group].push_back(static_cast<int64_t>(plan.blocks.size()));
        plan.blocks.push_back(b);
    }
    return plan;
}

// Runs (first column, length) of the columns that no present block of group g
// holds: zeros in the flat tensor, values that would be dropped on the way back.
std::vector<std::pair<int64_t, int64_t>> holes_of(const Plan& plan, int64_t g, int64_t dim) {
    std::vector<char> covered(dim, 0);
    for (auto bi: plan.by_group[g]) {
        const auto& b = plan.blocks[bi];
        for (int64_t p = 0; p < b.n_props; p++) {
            for (int64_t m = 0; m < 2 * b.l + 1; m++) {
                covered[b.columns[2 * p] + m * b.columns[2 * p + 1]] = 1;
            }
        }
    }
    std::vector<std::pair<int64_t, int64_t>> holes;
    for (int64_t c = 0; c < dim;) {
        if (covered[c]) { c++; continue; }
        auto c0 = c;
        while (c < dim && !covered[c]) c++;
        holes.emplace_back(c0, c - c0);
    }
    return holes;
}

// D_l in the scalar type, row by row (to_irreps) or column by column (from_irreps,
// which applies the transpose)
template <typename T>
std::vector<Sparse<T>> sparse_basis(const c10::optional<Tensor>& basis, int64_t max_l, bool transpose) {
    std::vector<Sparse<T>> result;
    if (!basis.has_value() || !basis->defined()) {
        return result;
    }
    auto D = basis->to(torch::kCPU, torch::kFloat64).contiguous();
    TORCH_CHECK(D.dim() == 3 && D.size(1) == D.size(2) && D.size(0) > max_l
        && D.size(1) >= 2 * max_l + 1, "rascaline_e3nn: bad basis matrices");
    auto K = D.size(1);
    const double* d = D.data_ptr<double>();
    for (int64_t l = 0; l <= max_l; l++) {
        Sparse<T> s;
        s.ptr.push_back(0);
        for (int64_t a = 0; a < 2 * l + 1; a++) {
            for (int64_t b = 0; b < 2 * l + 1; b++) {
                double v = transpose ? d[(l * K + b) * K + a] : d[(l * K + a) * K + b];
                if (v != 0.0) {
                    s.idx.push_back(b);
                    s.val.push_back(static_cast<T>(v));
                }
            }
            s.ptr.push_back(static_cast<int64_t>(s.idx.size()));
        }
        result.push_back(std::move(s));
    }
    return result;
}

int64_t max_l_of(const Plan& plan) {
    return (plan.max_k - 1) / 2;
}

// one block row [2l+1, P] (featomic basis) into its columns of a row
// PF > 0: the number of properties, known at compile time (the short inner loops
// then unroll into a few vector moves); PF = 0: read from the block.
// Rows [0, n) of a block (`src`, contiguous [n, 2l+1, P], featomic basis) into their
// columns of `n` staging rows of `dim` values.
template <typename T, int PF>
void put_rows(const Block& b, const T* __restrict__ src, int64_t n, const Sparse<T>* D,
              T* __restrict__ tmp, T* __restrict__ staging, int64_t dim) {
    const int64_t K = 2 * b.l + 1;
    const int64_t P = PF > 0 ? PF : b.n_props;
    const int64_t first = b.first;
    const int64_t step = b.step;
    const Run run = b.run;
    const int64_t* cols = b.columns;
    for (int64_t r = 0; r < n; r++, src += K * P, staging += dim) {
        T* __restrict__ row = staging;
        const T* __restrict__ from = src;
        if (D != nullptr && run == IR_MUL) {
            // x_e3nn[a] = sum_b D[a, b] x[b], straight into the row
            for (int64_t a = 0; a < K; a++) {
                T acc[PF > 0 ? PF : 1];
                T* __restrict__ dst = row + first + a * step;
                if (PF > 0) {
                    for (int64_t p = 0; p < P; p++) acc[p] = 0;
                    for (auto e = D->ptr[a]; e < D->ptr[a + 1]; e++) {
                        const T* __restrict__ s = from + D->idx[e] * P;
                        T d = D->val[e];
                        for (int64_t p = 0; p < P; p++) acc[p] += d * s[p];
                    }
                    for (int64_t p = 0; p < P; p++) dst[p] = acc[p];
                } else {
                    for (int64_t p = 0; p < P; p++) dst[p] = 0;
                    for (auto e = D->ptr[a]; e < D->ptr[a + 1]; e++) {
                        const T* __restrict__ s = from + D->idx[e] * P;
                        T d = D->val[e];
                        for (int64_t p = 0; p < P; p++) dst[p] += d * s[p];
                    }
                }
            }
            continue;
        }
        if (D != nullptr) {
            for (int64_t a = 0; a < K; a++) {
                T* __restrict__ acc = tmp + a * P;
                for (int64_t p = 0; p < P; p++) acc[p] = 0;
                for (auto e = D->ptr[a]; e < D->ptr[a + 1]; e++) {
                    const T* __restrict__ s = from + D->idx[e] * P;
                    T d = D->val[e];
                    for (int64_t p = 0; p < P; p++) acc[p] += d * s[p];
                }
            }
            from = tmp;
        }
        if (run == MUL_IR) {
            T* __restrict__ dst = row + first;
            for (int64_t p = 0; p < P; p++) {
                for (int64_t m = 0; m < K; m++) dst[p * K + m] = from[m * P + p];
            }
        } else if (run == IR_MUL) {
            for (int64_t m = 0; m < K; m++) {
                T* __restrict__ dst = row + first + m * step;
                const T* __restrict__ s = from + m * P;
                for (int64_t p = 0; p < P; p++) dst[p] = s[p];
            }
        } else {
            for (int64_t p = 0; p < P; p++) {
                T* dst = row + cols[2 * p];
                auto c_step = cols[2 * p + 1];
                for (int64_t m = 0; m < K; m++) dst[m * c_step] = from[m * P + p];
            }
        }
    }
}

// the columns of a block in `n` staging rows of `dim` values into its rows [0, n)
// (`dst`, contiguous [n, 2l+1, P], featomic basis); D lists the transpose:
// x_featomic[a] = sum_b D[b, a] x_e3nn[b]
template <typename T, int PF>
void get_rows(const Block& b, const T* __restrict__ staging, int64_t n, int64_t dim,
              const Sparse<T>* D, T* __restrict__ tmp, T* __restrict__ dst) {
    const int64_t K = 2 * b.l + 1;
    const int64_t P = PF > 0 ? PF : b.n_props;
    const int64_t first = b.first;
    const int64_t step = b.step;
    const Run run = b.run;
    const int64_t* cols = b.columns;
    for (int64_t r = 0; r < n; r++, staging += dim, dst += K * P) {
        const T* __restrict__ row = staging;
        if (D != nullptr && run == IR_MUL) {
            for (int64_t a = 0; a < K; a++) {
                T* __restrict__ acc = dst + a * P;
                for (int64_t p = 0; p < P; p++) acc[p] = 0;
                for (auto e = D->ptr[a]; e < D->ptr[a + 1]; e++) {
                    const T* __restrict__ s = row + first + D->idx[e] * step;
                    T d = D->val[e];
                    for (int64_t p = 0; p < P; p++) acc[p] += d * s[p];
                }
            }
            continue;
        }
        T* __restrict__ into = D != nullptr ? tmp : dst;
        if (run == MUL_IR) {
            const T* __restrict__ s = row + first;
            for (int64_t m = 0; m < K; m++) {
                T* __restrict__ d = into + m * P;
                for (int64_t p = 0; p < P; p++) d[p] = s[p * K + m];
            }
        } else if (run == IR_MUL) {
            for (int64_t m = 0; m < K; m++) {
                T* __restrict__ d = into + m * P;
                const T* __restrict__ s = row + first + m * step;
                for (int64_t p = 0; p < P; p++) d[p] = s[p];
            }
        } else {
            for (int64_t p = 0; p < P; p++) {
                const T* s = row + cols[2 * p];
                auto c_step = cols[2 * p + 1];
                for (int64_t m = 0; m < K; m++) into[m * P + p] = s[m * c_step];
            }
        }
        if (D != nullptr) {
            for (int64_t a = 0; a < K; a++) {
                T* __restrict__ acc = dst + a * P;
                for (int64_t p = 0; p < P; p++) acc[p] = 0;
                for (auto e = D->ptr[a]; e < D->ptr[a + 1]; e++) {
                    const T* __restrict__ s = tmp + D->idx[e] * P;
                    T d = D->val[e];
                    for (int64_t p = 0; p < P; p++) acc[p] += d * s[p];
                }
            }
        }
    }
}

// rows are handled in chunks of CHUNK: each chunk is assembled (or read) in a
// cache-resident staging buffer, block after block, so that every block is read
// (or written) as one sequential stream and every flat row is written (or read)
// in one contiguous copy
constexpr int64_t CHUNK = 16;

// a plain loop rather than memcpy: glibc's memcpy uses `rep movsb` for rows of
// a few KiB, measured 5x slower than this loop on the AMD EPYC this was tuned on
template <typename T>
inline void copy_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
    for (int64_t k = 0; k < n; k++) dst[k] = src[k];
}

// the same, bypassing the cache for the destination (non-temporal stores): the
// flat output is written once and is too large to stay cached, so ordinary
// stores would first read every line of it
template <typename T>
inline void stream_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
#if defined(__SSE2__)
    auto bytes = n * static_cast<int64_t>(sizeof(T));
    auto address = reinterpret_cast<uintptr_t>(dst);
    if (address % 16 == 0) {
        auto chunks = bytes / 16;
        auto* d = reinterpret_cast<__m128i*>(dst);
        auto* s = reinterpret_cast<const __m128i*>(src);
        for (int64_t k = 0; k < chunks; k++) {
            _mm_stream_si128(d + k, _mm_loadu_si128(s + k));
        }
        auto done = chunks * 16 / static_cast<int64_t>(sizeof(T));
        for (int64_t k = done; k < n; k++) dst[k] = src[k];
        return;
    }
#endif
    copy_row(dst, src, n);
}

#define RASCALINE_E3NN_BY_PROPERTIES(P, CALL) \
    switch (P) { \
        case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
        case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
        case 7: CALL(7); break; case 8: CALL(8); break; case 9: CALL(9); break; \
        case 10: CALL(10); break; case 11: CALL(11); break; case 12: CALL(12); break; \
        case 13: CALL(13); break; case 14: CALL(14); break; case 15: CALL(15); break; \
        case 16: CALL(16); break; default: CALL(0); break; \
    }

template <typename T>
const Sparse<T>* basis_of(const std::vector<Sparse<T>>& basis, const Block& b) {
    return (!basis.empty() && b.l >= 1) ? &basis[b.l] : nullptr;
}

// maps[slot]: for blocks that lack some rows of their group, the block row of every
// group row (-1: absent, zeros), or nullptr when the block has every row in order
template <typename T>
void scatter_kernel(
    const Plan& plan,
    const std::vector<Tensor>& values,
    const std::vector<const int64_t*>& maps,
    const int64_t* position,
    const std::vector<Sparse<T>>& basis,
    T* out,
    int64_t dim
) {
    auto n_groups = static_cast<int64_t>(plan.by_group.size());
    for (int64_t g = 0; g < n_groups; g++) {
        const auto& members = plan.by_group[g];
        auto n = plan.group_rows[g];
        if (n == 0) {
            continue;
        }
        // columns that no present block of this group writes: zero
        auto holes = holes_of(plan, g, dim);
        std::vector<const T*> sources;
        std::vector<const int64_t*> member_maps;
        for (auto bi: members) {
            sources.push_back(values[plan.blocks[bi].slot].template data_ptr<T>());
            member_maps.push_back(maps[plan.blocks[bi].slot]);
        }
        const int64_t* rows = position + plan.group_start[g];
        at::parallel_for(0, n, CHUNK, [&](int64_t begin, int64_t end) {
            std::vector<T> tmp(plan.max_k * std::max<int64_t>(plan.max_props, 1));
            const std::vector<T> zeros(plan.max_k * std::max<int64_t>(plan.max_props, 1), 0);
            std::vector<T> staging(CHUNK * dim);
            for (int64_t c0 = begin; c0 < end; c0 += CHUNK) {
                auto c1 = std::min(end, c0 + CHUNK);
                for (int64_t i = c0; i < c1; i++) {
                    for (const auto& h: holes) {
                        std::memset(staging.data() + (i - c0) * dim + h.first, 0, h.second * sizeof(T));
                    }
                }
                for (size_t j = 0; j < members.size(); j++) {
                    const auto& b = plan.blocks[members[j]];
                    auto size = (2 * b.l + 1) * b.n_props;
                    auto D = basis_of(basis, b);
                    const int64_t* map = member_maps[j];
#define RASCALINE_E3NN_PUT(PF) \
                    if (map == nullptr) { \
                        put_rows<T, PF>(b, sources[j] + c0 * size, c1 - c0, D, tmp.data(), staging.data(), dim); \
                    } else { \
                        for (int64_t i = c0; i < c1; i++) { \
                            T* row = staging.data() + (i - c0) * dim; \
                            if (map[i] < 0) { \
                                put_rows<T, PF>(b, zeros.data(), 1, nullptr, tmp.data(), row, dim); \
                            } else { \
                                put_rows<T, PF>(b, sources[j] + map[i] * size, 1, D, tmp.data(), row, dim); \
                            } \
                        } \
                    }
                    RASCALINE_E3NN_BY_PROPERTIES(b.n_props, RASCALINE_E3NN_PUT)
#undef RASCALINE_E3NN_PUT
                }
                for (int64_t i = c0; i < c1; i++) {
                    stream_row(out + rows[i] * dim, staging.data() + (i - c0) * dim, dim);
                }
            }
        });
    }
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

template <typename T>
void gather_kernel(
    const Plan& plan,
    const T* x,
    int64_t dim,
    const int64_t* position,
    const std::vector<Sparse<T>>& basis,
    const std::vector<const int64_t*>& maps,
    std::vector<Tensor>& values
) {
    auto n_groups = static_cast<int64_t>(plan.by_group.size());
    for (int64_t g = 0; g < n_groups; g++) {
        const auto& members = plan.by_group[g];
        auto n = plan.group_rows[g];
        if (n == 0 || members.empty()) {
            continue;
        }
        std::vector<T*> targets;
        std::vector<const int64_t*> member_maps;
        for (auto bi: members) {
            targets.push_back(values[plan.blocks[bi].slot].template data_ptr<T>());
            member_maps.push_back(maps[plan.blocks[bi].slot]);
        }
        const int64_t* rows = position + plan.group_start[g];
        at::parallel_for(0, n, CHUNK, [&](int64_t begin, int64_t end) {
            std::vector<T> tmp(plan.max_k * std::max<int64_t>(plan.max_props, 1));
            std::vector<T> staging(CHUNK * dim);
            for (int64_t c0 = begin; c0 < end; c0 += CHUNK) {
                auto c1 = std::min(end, c0 + CHUNK);
                for (int64_t i = c0; i < c1; i++) {
                    copy_row(staging.data() + (i - c0) * dim, x + rows[i] * dim, dim);
                }
                for (size_t j = 0; j < members.size(); j++) {
                    const auto& b = plan.blocks[members[j]];
                    auto size = (2 * b.l + 1) * b.n_props;
                    auto D = basis_of(basis, b);
                    const int64_t* map = member_maps[j];
#define RASCALINE_E3NN_GET(PF) \
                    if (map == nullptr) { \
                        get_rows<T, PF>(b, staging.data(), c1 - c0, dim, D, tmp.data(), targets[j] + c0 * size); \
                    } else { \
                        for (int64_t i = c0; i < c1; i++) { \
                            if (map[i] >= 0) { \
                                get_rows<T, PF>(b, staging.data() + (i - c0) * dim, 1, dim, D, tmp.data(), targets[j] + map[i] * size); \
                            } \
                        } \
                    }
                    RASCALINE_E3NN_BY_PROPERTIES(b.n_props, RASCALINE_E3NN_GET)
#undef RASCALINE_E3NN_GET
                }
            }
        });
    }
}

// the rows of a block: its group's, or the entries of its row map
int64_t block_rows(const Plan& plan, const Block& b, const std::vector<Tensor>& row_maps) {
    if (row_maps.empty() || !row_maps[b.slot].defined()) {
        return plan.group_rows[b.group];
    }
    const auto& map = row_maps[b.slot];
    TORCH_CHECK(map.scalar_type() == torch::kInt64 && map.is_contiguous() && map.dim() == 1
        && map.size(0) == plan.group_rows[b.group], "rascaline_e3nn: bad row map");
    const int64_t* m = map.data_ptr<int64_t>();
    int64_t count = 0;
    for (int64_t i = 0; i < map.size(0); i++) {
        if (m[i] >= 0) count++;
    }
    return count;
}

std::vector<const int64_t*> map_pointers(const Plan& plan, const std::vector<Tensor>& row_maps) {
    std::vector<const int64_t*> maps(plan.blocks.size(), nullptr);
    for (const auto& b: plan.blocks) {
        if (!row_maps.empty() && row_maps[b.slot].defined()) {
            auto n = block_rows(plan, b, row_maps);
            const int64_t* m = row_maps[b.slot].data_ptr<int64_t>();
            for (int64_t i = 0; i < row_maps[b.slot].size(0); i++) {
                TORCH_CHECK(m[i] < n, "rascaline_e3nn: row map out of range");
            }
            maps[b.slot] = m;
        }
    }
    return maps;
}

void check_position(const Tensor& position) {
    TORCH_CHECK(position.device().is_cpu() && position.scalar_type() == torch::kInt64
        && position.dim() == 1, "rascaline_e3nn: position must be a 1-D int64 CPU tensor");
}

Tensor to_irreps_kernel(
    const std::vector<Tensor>& values_in,
    c10::IntArrayRef slots,
    const Tensor& position_in,
    c10::IntArrayRef group_rows,
    const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta,
    c10::IntArrayRef columns,
    int64_t dim,
    const Tensor& like,
    const std::vector<Tensor>& row_maps
) {
    check_position(position_in);
    auto position = position_in.contiguous();
    auto n = position.size(0);
    auto plan = make_plan(static_cast<int64_t>(values_in.size()), slots, group_rows, meta, columns, n, dim);
    auto dtype = like.scalar_type();
    std::vector<Tensor> values;
    for (const auto& b: plan.blocks) {
        const auto& v = values_in[b.slot];
        TORCH_CHECK(v.device().is_cpu(), "rascaline_e3nn: fused kernel values must be on the CPU");
        TORCH_CHECK(v.scalar_type() == dtype, "rascaline_e3nn: blocks of different dtypes");
        TORCH_CHECK(v.dim() == 3 && v.size(0) == block_rows(plan, b, row_maps) && v.size(1) == 2 * b.l + 1
            && v.size(2) == b.n_props, "rascaline_e3nn: block values of shape ", v.sizes(),
            " do not match the plan");
    }
    auto maps = map_pointers(plan, row_maps);
    for (const auto& v: values_in) {
        values.push_back(v.contiguous());
    }
    auto pos = position.data_ptr<int64_t>();
    for (int64_t k = 0; k < n; k++) {
        TORCH_CHECK(pos[k] >= 0 && pos[k] < n, "rascaline_e3nn: position out of range");
    }
    auto out = torch::empty({n, dim}, like.options().device(torch::kCPU));
    AT_DISPATCH_FLOATING_TYPES(dtype, "rascaline_e3nn::to_irreps", [&] {
        auto D = sparse_basis<scalar_t>(basis, max_l_of(plan), /*transpose=*/false);
        scatter_kernel<scalar_t>(plan, values, maps, pos, D, out.data_ptr<scalar_t>(), dim);
    });
    return out;
}

std::vector<Tensor> from_irreps_kernel(
    const Tensor& x_in,
    c10::IntArrayRef slots,
    const Tensor& position_in,
    c10::IntArrayRef group_rows,
    const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta,
    c10::IntArrayRef columns,
    const std::vector<Tensor>& row_maps
) {
    check_position(position_in);
    TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "rascaline_e3nn: x must be a 2-D CPU tensor");
    auto position = position_in.contiguous();
    auto x = x_in.contiguous();
    auto n = position.size(0);
    auto dim = x.size(1);
    auto plan = make_plan(static_cast<int64_t>(slots.size()), slots, group_rows, meta, columns, n, dim);
    auto pos = position.data_ptr<int64_t>();
    for (int64_t k = 0; k < n; k++) {
        TORCH_CHECK(pos[k] >= 0 && pos[k] < x.size(0), "rascaline_e3nn: position out of range");
    }
    std::vector<Tensor> values(plan.blocks.size());
    for (const auto& b: plan.blocks) {
        values[b.slot] = torch::empty({block_rows(plan, b, row_maps), 2 * b.l + 1, b.n_props}, x.options());
    }
    auto maps = map_pointers(plan, row_maps);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rascaline_e3nn::from_irreps", [&] {
        auto D = sparse_basis<scalar_t>(basis, max_l_of(plan), /*transpose=*/true);
        gather_kernel<scalar_t>(plan, x.data_ptr<scalar_t>(), dim, pos, D, maps, values);
    });
    return values;
}


// ---------------------------------------------------------------- autograd
//
// D_l is orthogonal, so the two kernels are each other's adjoint: the backward of
// one is the other (a gather, never an accumulation), and double backward follows.

std::vector<Tensor> from_irreps_autograd(
    const Tensor& x, c10::IntArrayRef slots, const Tensor& position,
    c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta, c10::IntArrayRef columns,
    const std::vector<Tensor>& row_maps = {});

Tensor to_irreps_autograd(
    const std::vector<Tensor>& values, c10::IntArrayRef slots, const Tensor& position,
    c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta, c10::IntArrayRef columns, int64_t dim,
    const std::vector<Tensor>& row_maps = {});

struct Saved {
    std::vector<int64_t> slots, group_rows, meta, columns;
    c10::optional<Tensor> basis;
    Tensor position;
    std::vector<Tensor> row_maps;
};

void save(AutogradContext* ctx, c10::IntArrayRef slots, const Tensor& position,
          c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
          c10::IntArrayRef meta, c10::IntArrayRef columns, const std::vector<Tensor>& row_maps) {
    // undefined maps (identity) are saved as empty tensors
    c10::List<Tensor> maps;
    for (const auto& m: row_maps) maps.push_back(m.defined() ? m : torch::Tensor(torch::empty({0}, torch::kInt64)));
    ctx->saved_data["row_maps"] = maps;
    ctx->saved_data["has_maps"] = !row_maps.empty();
    ctx->saved_data["slots"] = slots.vec();
    ctx->saved_data["position"] = position;
    ctx->saved_data["group_rows"] = group_rows.vec();
    ctx->saved_data["basis"] = basis.has_value() ? c10::IValue(*basis) : c10::IValue();
    ctx->saved_data["meta"] = meta.vec();
    ctx->saved_data["columns"] = columns.vec();
}

Saved load(AutogradContext* ctx) {
    Saved s;
    s.slots = ctx->saved_data["slots"].toIntVector();
    s.position = ctx->saved_data["position"].toTensor();
    s.group_rows = ctx->saved_data["group_rows"].toIntVector();
    auto basis = ctx->saved_data["basis"];
    if (!basis.isNone()) s.basis = basis.toTensor();
    s.meta = ctx->saved_data["meta"].toIntVector();
    s.columns = ctx->saved_data["columns"].toIntVector();
    if (ctx->saved_data["has_maps"].toBool()) {
        for (const auto& m: ctx->saved_data["row_maps"].toTensorVector()) {
            s.row_maps.push_back(m.numel() == 0 && m.dim() == 1 && m.size(0) == 0 ? Tensor() : m);
        }
    }
    return s;
}

class ToIrreps: public torch::autograd::Function<ToIrreps> {
public:
    static Tensor forward(
        AutogradContext* ctx, at::TensorList values, c10::IntArrayRef slots,
        const Tensor& position, c10::IntArrayRef group_rows,
        const c10::optional<Tensor>& basis, c10::IntArrayRef meta,
        c10::IntArrayRef columns, int64_t dim, const Tensor& like,
        const std::vector<Tensor>& row_maps
    ) {
        save(ctx, slots, position, group_rows, basis, meta, columns, row_maps);
        return to_irreps_kernel(values.vec(), slots, position, group_rows, basis, meta, columns, dim, like, row_maps);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad) {
        auto s = load(ctx);
        auto grads = from_irreps_autograd(grad[0], s.slots, s.position, s.group_rows, s.basis, s.meta, s.columns, s.row_maps);
        // slots, position, group_rows, basis, meta, columns, dim, like, row_maps
        for (int i = 0; i < 10; i++) grads.emplace_back();
        return grads;
    }
};

class FromIrreps: public torch::autograd::Function<FromIrreps> {
public:
    static variable_list forward(
        AutogradContext* ctx, const Tensor& x, c10::IntArrayRef slots,
        const Tensor& position, c10::IntArrayRef group_rows,
        const c10::optional<Tensor>& basis, c10::IntArrayRef meta,
        c10::IntArrayRef columns, const std::vector<Tensor>& row_maps
    ) {
        save(ctx, slots, position, group_rows, basis, meta, columns, row_maps);
        ctx->saved_data["rows"] = x.size(0);
        ctx->saved_data["dim"] = x.size(1);
        return from_irreps_kernel(x, slots, position, group_rows, basis, meta, columns, row_maps);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad) {
        auto s = load(ctx);
        auto dim = ctx->saved_data["dim"].toInt();
        auto rows = ctx->saved_data["rows"].toInt();
        TORCH_CHECK(rows == s.position.size(0), "rascaline_e3nn: from_irreps backward needs a bijection on rows");
        // an undefined gradient (output unused) comes materialized as zeros
        auto out = to_irreps_autograd(grad, s.slots, s.position, s.group_rows, s.basis, s.meta, s.columns, dim, s.row_maps);
        variable_list result = {out};
        for (int i = 0; i < 7; i++) result.emplace_back();
        return result;
    }
};

Tensor like_of(const std::vector<Tensor>& values) {
    TORCH_CHECK(!values.empty(), "rascaline_e3nn: to_irreps needs at least one block");
    return values[0];
}

Tensor to_irreps_autograd(
    const std::vector<Tensor>& values, c10::IntArrayRef slots, const Tensor& position,
    c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta, c10::IntArrayRef columns, int64_t dim,
    const std::vector<Tensor>& row_maps
) {
    auto like = like_of(values).detach();
    return ToIrreps::apply(at::TensorList(values), slots, position, group_rows, basis, meta, columns, dim, like, row_maps);
}

Tensor to_irreps_op(
    const std::vector<Tensor>& values, c10::IntArrayRef slots, const Tensor& position,
    c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta, c10::IntArrayRef columns, int64_t dim
) {
    return to_irreps_autograd(values, slots, position, group_rows, basis, meta, columns, dim);
}

std::vector<Tensor> from_irreps_autograd(
    const Tensor& x, c10::IntArrayRef slots, const Tensor& position,
    c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta, c10::IntArrayRef columns,
    const std::vector<Tensor>& row_maps
) {
    return FromIrreps::apply(x, slots, position, group_rows, basis, meta, columns, row_maps);
}

std::vector<Tensor> from_irreps_op(
    const Tensor& x, c10::IntArrayRef slots, const Tensor& position,
    c10::IntArrayRef group_rows, const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta, c10::IntArrayRef columns
) {
    return from_irreps_autograd(x, slots, position, group_rows, basis, meta, columns);
}


// ---------------------------------------------------------------- whole TensorMap
//
// The common case of TensorMapToIrreps, metadata included: every key of the input is
// in the layout, once; names, components (when `check`) and properties are the
// template's; the blocks of a row group share their samples; CPU floating point
// values; no duplicated rows (when `check`). Anything else returns (false, _) and
// the TorchScript code takes its detailed path, which handles or names it.

bool equal_int32(const Tensor& a, const Tensor& b) {
    if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) {
        return false;
    }
    if (!a.device().is_cpu() || !b.device().is_cpu()) {
        return false;
    }
    if (a.is_same(b)) {
        return true;
    }
    auto ac = a.contiguous();
    auto bc = b.contiguous();
    return std::memcmp(ac.data_ptr(), bc.data_ptr(), ac.numel() * ac.element_size()) == 0;
}

struct Collected {
    bool ok = false;
    std::vector<Tensor> values;     // present blocks, in input order
    std::vector<int64_t> slots;     // their planned block
    std::vector<int64_t> group_rows;
    Tensor position;                // output row of every group row (int64)
    std::vector<int32_t> table;     // every group row: samples, then row keys
    std::vector<int64_t> order;     // group rows in output order
    int64_t width = 0;              // columns of `table`
    bool unique = true;             // no two rows alike
    std::vector<Tensor> row_maps;   // per present block: its row of every group row
                                    // (-1: absent), undefined when it has them all
};

Collected collect_map(
    const metatensor_torch::TensorMap& tensor,
    const std::vector<std::string>& key_names,
    const Tensor& template_keys,
    const std::vector<std::string>& sample_names,
    const std::vector<std::string>& property_names,
    c10::IntArrayRef block_l,
    c10::IntArrayRef block_group,
    const std::vector<Tensor>& template_properties,
    const Tensor& group_keys,
    bool check
) {
    Collected not_fast;
    auto n_blocks = template_keys.size(0);
    auto n_key = static_cast<int64_t>(key_names.size());
    auto n_groups = group_keys.size(0);
    auto n_row_keys = group_keys.size(1);
    TORCH_CHECK(template_keys.scalar_type() == torch::kInt32 && template_keys.is_contiguous()
        && template_keys.size(1) == n_key, "rascaline_e3nn: bad template keys");
    TORCH_CHECK(group_keys.scalar_type() == torch::kInt32 && group_keys.device().is_cpu(),
        "rascaline_e3nn: bad group keys");

    // ---- keys, matched by value
    auto keys = tensor->keys();
    auto names = keys->names();
    if (static_cast<int64_t>(names.size()) != n_key) return not_fast;
    std::vector<int64_t> key_columns;
    for (const auto& name: key_names) {
        auto it = std::find(names.begin(), names.end(), name);
        if (it == names.end()) return not_fast;
        key_columns.push_back(it - names.begin());
    }
    auto key_values = keys->values();
    if (!key_values.device().is_cpu() || key_values.scalar_type() != torch::kInt32) return not_fast;
    key_values = key_values.contiguous();
    auto n_in = key_values.size(0);
    const int32_t* kv = key_values.data_ptr<int32_t>();
    const int32_t* tk = template_keys.data_ptr<int32_t>();
    std::vector<int64_t> slots(n_in, -1);
    std::vector<bool> seen(n_blocks, false);
    for (int64_t i = 0; i < n_in; i++) {
        for (int64_t t = 0; t < n_blocks; t++) {
            bool same = true;
            for (int64_t c = 0; c < n_key && same; c++) {
                same = kv[i * n_key + key_columns[c]] == tk[t * n_key + c];
            }
            if (same) { slots[i] = t; break; }
        }
        if (slots[i] < 0 || seen[slots[i]]) return not_fast;
        seen[slots[i]] = true;
    }
    if (n_in == 0) return not_fast;

    // ---- names, the same for every block of a TensorMap
    if (tensor->sample_names() != sample_names) return not_fast;
    if (tensor->component_names() != std::vector<std::string>{"o3_mu"}) return not_fast;
    if (tensor->property_names() != property_names) return not_fast;
    auto blocks = metatensor_torch::TensorMapHolder::blocks(tensor);
    if (!blocks[0]->gradients_list().empty()) return not_fast;

    // ---- blocks
    std::vector<Tensor> values;
    std::vector<Tensor> block_samples;
    std::vector<Tensor> samples(n_groups);
    std::vector<bool> shared(n_groups, true);
    auto dtype = blocks[0]->values().scalar_type();
    if (dtype != torch::kFloat32 && dtype != torch::kFloat64) return not_fast;
    for (int64_t i = 0; i < n_in; i++) {
        auto t = slots[i];
        const auto& block = blocks[i];
        auto value = block->values();
        auto l = block_l[t];
        if (value.dim() != 3 || value.size(1) != 2 * l + 1 || !value.device().is_cpu()
            || value.scalar_type() != dtype) {
            return not_fast;
        }
        if (check) {
            auto mu = block->components()[0]->values().contiguous();
            if (mu.numel() != 2 * l + 1 || mu.scalar_type() != torch::kInt32 || !mu.device().is_cpu()) return not_fast;
            const int32_t* m = mu.data_ptr<int32_t>();
            for (int64_t k = 0; k < 2 * l + 1; k++) {
                if (m[k] != k - l) return not_fast;
            }
        }
        if (!equal_int32(block->properties()->values(), template_properties[t])) return not_fast;
        auto sample_values = block->samples()->values();
        if (!sample_values.device().is_cpu() || sample_values.scalar_type() != torch::kInt32) return not_fast;
        auto g = block_group[t];
        if (!samples[g].defined()) {
            samples[g] = sample_values.contiguous();
        } else if (!equal_int32(sample_values, samples[g])) {
            shared[g] = false;
        }
        block_samples.push_back(sample_values.contiguous());
        values.push_back(value);
    }

    // ---- groups whose blocks have different samples (featomic gives them for
    // centers without neighbours of some type): rows are the sorted union, each
    // block placed by a row map, zeros where it has no entry
    std::vector<Tensor> row_maps(n_in);
    auto n_sample_dims = static_cast<int64_t>(sample_names.size());
    for (int64_t g = 0; g < n_groups; g++) {
        if (shared[g]) continue;
        std::vector<int64_t> members;
        for (int64_t i = 0; i < n_in; i++) {
            if (block_group[slots[i]] == g) members.push_back(i);
        }
        // every (member, row), sorted by sample values then member
        std::vector<std::pair<int64_t, int64_t>> refs;
        for (int64_t j = 0; j < static_cast<int64_t>(members.size()); j++) {
            for (int64_t r = 0; r < block_samples[members[j]].size(0); r++) refs.emplace_back(j, r);
        }
        std::vector<const int32_t*> member_samples;
        for (auto i: members) member_samples.push_back(block_samples[i].data_ptr<int32_t>());
        auto row_of = [&](const std::pair<int64_t, int64_t>& ref) {
            return member_samples[ref.first] + ref.second * n_sample_dims;
        };
        auto compare = [&](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
            const int32_t* ra = row_of(a);
            const int32_t* rb = row_of(b);
            for (int64_t c = 0; c < n_sample_dims; c++) {
                if (ra[c] != rb[c]) return ra[c] < rb[c] ? -1 : 1;
            }
            return 0;
        };
        std::sort(refs.begin(), refs.end(), [&](const auto& a, const auto& b) {
            auto c = compare(a, b);
            return c != 0 ? c < 0 : a.first < b.first;
        });
        std::vector<int32_t> union_values;
        std::vector<std::vector<int64_t>> maps(members.size());
        int64_t u = -1;
        for (size_t k = 0; k < refs.size(); k++) {
            if (k == 0 || compare(refs[k - 1], refs[k]) != 0) {
                u += 1;
                const int32_t* row = row_of(refs[k]);
                union_values.insert(union_values.end(), row, row + n_sample_dims);
            } else if (refs[k - 1].first == refs[k].first) {
                return not_fast;  // a block with duplicated samples: named by the detailed path
            }
            auto& map = maps[refs[k].first];
            map.resize(u + 1, -1);
            map[u] = refs[k].second;
        }
        auto n_union = u + 1;
        auto union_tensor = torch::empty({n_union, n_sample_dims}, torch::kInt32);
        if (n_union > 0) {
            std::memcpy(union_tensor.data_ptr<int32_t>(), union_values.data(), union_values.size() * sizeof(int32_t));
        }
        samples[g] = union_tensor;
        for (size_t j = 0; j < members.size(); j++) {
            maps[j].resize(n_union, -1);
            auto map = torch::empty({n_union}, torch::kInt64);
            if (n_union > 0) std::memcpy(map.data_ptr<int64_t>(), maps[j].data(), n_union * sizeof(int64_t));
            row_maps[members[j]] = map;
        }
    }

    // ---- rows: (samples, row keys) of every group, sorted lexicographically
    std::vector<int64_t> group_rows(n_groups, 0);
    std::vector<int64_t> group_start(n_groups + 1, 0);
    for (int64_t g = 0; g < n_groups; g++) {
        group_rows[g] = samples[g].defined() ? samples[g].size(0) : 0;
        group_start[g + 1] = group_start[g] + group_rows[g];
    }
    auto n_rows = group_start[n_groups];
    auto n_sample = static_cast<int64_t>(sample_names.size());
    // one table of all rows, [n_rows, n_sample + n_row_keys]
    auto width = n_sample + n_row_keys;
    std::vector<int32_t> table(n_rows * width);
    auto gk = group_keys.contiguous();
    const int32_t* gkp = gk.data_ptr<int32_t>();
    for (int64_t g = 0; g < n_groups; g++) {
        if (group_rows[g] == 0) continue;
        const int32_t* sp = samples[g].data_ptr<int32_t>();
        for (int64_t r = 0; r < group_rows[g]; r++) {
            int32_t* row = table.data() + (group_start[g] + r) * width;
            std::memcpy(row, sp + r * n_sample, n_sample * sizeof(int32_t));
            std::memcpy(row + n_sample, gkp + g * n_row_keys, n_row_keys * sizeof(int32_t));
        }
    }
    std::vector<int64_t> order(n_rows);
    std::iota(order.begin(), order.end(), 0);
    auto less = [&](int64_t a, int64_t b) {
        const int32_t* ra = table.data() + a * width;
        const int32_t* rb = table.data() + b * width;
        for (int64_t c = 0; c < width; c++) {
            if (ra[c] != rb[c]) return ra[c] < rb[c];
        }
        return false;
    };
    std::stable_sort(order.begin(), order.end(), less);
    bool unique = true;
    for (int64_t k = 1; k < n_rows && unique; k++) {
        unique = less(order[k - 1], order[k]);
    }
    if (check && !unique) return not_fast;  // a duplicated row: named by the detailed path
    auto position = torch::empty({n_rows}, torch::kInt64);
    auto* pos = position.data_ptr<int64_t>();
    for (int64_t k = 0; k < n_rows; k++) {
        pos[order[k]] = k;
    }
    Collected result;
    result.ok = true;
    result.values = std::move(values);
    result.slots = std::move(slots);
    result.group_rows = std::move(group_rows);
    result.position = position;
    result.table = std::move(table);
    result.order = std::move(order);
    result.width = width;
    result.unique = unique;
    bool any_map = false;
    for (const auto& m: row_maps) any_map = any_map || m.defined();
    if (any_map) result.row_maps = std::move(row_maps);
    return result;
}

std::tuple<bool, Tensor> to_irreps_map(
    const metatensor_torch::TensorMap& tensor,
    const std::vector<std::string>& key_names,
    const Tensor& template_keys,
    const std::vector<std::string>& sample_names,
    const std::vector<std::string>& property_names,
    c10::IntArrayRef block_l,
    c10::IntArrayRef block_group,
    const std::vector<Tensor>& template_properties,
    const Tensor& group_keys,
    bool check,
    const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta,
    c10::IntArrayRef columns,
    int64_t dim
) {
    auto c = collect_map(tensor, key_names, template_keys, sample_names, property_names,
                         block_l, block_group, template_properties, group_keys, check);
    if (!c.ok) {
        return std::make_tuple(false, torch::empty({0}));
    }
    auto out = to_irreps_autograd(c.values, c.slots, c.position, c.group_rows, basis, meta, columns, dim, c.row_maps);
    return std::make_tuple(true, out);
}

// The rows of TensorMapToIrreps' output (samples, then the row keys), for the same
// common case; no Labels when the rows are not unique or the case is not common.
std::vector<metatensor_torch::Labels> samples_map(
    const metatensor_torch::TensorMap& tensor,
    const std::vector<std::string>& key_names,
    const Tensor& template_keys,
    const std::vector<std::string>& sample_names,
    const std::vector<std::string>& row_key_names,
    const std::vector<std::string>& property_names,
    c10::IntArrayRef block_l,
    c10::IntArrayRef block_group,
    const std::vector<Tensor>& template_properties,
    const Tensor& group_keys,
    bool check
) {
    auto c = collect_map(tensor, key_names, template_keys, sample_names, property_names,
                         block_l, block_group, template_properties, group_keys, check);
    if (!c.ok || !c.unique) {
        return {};
    }
    auto n_rows = static_cast<int64_t>(c.order.size());
    auto values = torch::empty({n_rows, c.width}, torch::kInt32);
    auto* v = values.data_ptr<int32_t>();
    for (int64_t k = 0; k < n_rows; k++) {
        std::memcpy(v + k * c.width, c.table.data() + c.order[k] * c.width, c.width * sizeof(int32_t));
    }
    auto names = sample_names;
    names.insert(names.end(), row_key_names.begin(), row_key_names.end());
    return {torch::make_intrusive<metatensor_torch::LabelsHolder>(
        torch::IValue(names), values, metatensor::assume_unique{}
    )};
}


// IrrepsToTensorMap's common case, metadata included: CPU floating point x, the
// layout's sample and row-key dimensions present, no duplicated rows, every row in
// a group of the layout. Anything else returns no TensorMap and the TorchScript code
// takes its detailed path, which names the problem.
std::vector<metatensor_torch::TensorMap> from_irreps_map(
    const Tensor& x,
    const metatensor_torch::Labels& samples,
    bool all_samples,
    const std::vector<std::string>& sample_names,
    const std::vector<std::string>& row_key_names,
    const Tensor& group_keys,
    const metatensor_torch::Labels& keys,
    const std::vector<metatensor_torch::Labels>& components,
    const std::vector<metatensor_torch::Labels>& properties,
    c10::IntArrayRef block_l,
    c10::IntArrayRef block_group,
    const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta,
    c10::IntArrayRef columns,
    bool check_holes
) {
    std::vector<metatensor_torch::TensorMap> none;
    if (!x.device().is_cpu() || x.dim() != 2
        || (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kFloat64)) {
        return none;
    }
    TORCH_CHECK(group_keys.scalar_type() == torch::kInt32 && group_keys.device().is_cpu(),
        "rascaline_e3nn: bad group keys");
    auto n = x.size(0);
    auto names = samples->names();
    auto sample_values = samples->values();
    if (!sample_values.device().is_cpu() || sample_values.scalar_type() != torch::kInt32
        || sample_values.dim() != 2 || sample_values.size(0) != n) {
        return none;
    }
    sample_values = sample_values.contiguous();
    const int32_t* sv = sample_values.data_ptr<int32_t>();
    auto width = sample_values.size(1);

    auto column = [&](const std::string& name) -> int64_t {
        auto it = std::find(names.begin(), names.end(), name);
        return it == names.end() ? -1 : it - names.begin();
    };
    std::vector<int64_t> sample_columns;
    std::vector<std::string> out_names;
    if (all_samples) {
        for (int64_t c = 0; c < width; c++) sample_columns.push_back(c);
        out_names = names;
    } else {
        for (const auto& name: sample_names) {
            auto c = column(name);
            if (c < 0) return none;
            sample_columns.push_back(c);
        }
        out_names = sample_names;
    }
    std::vector<int64_t> row_columns;
    for (const auto& name: row_key_names) {
        auto c = column(name);
        if (c < 0) return none;
        row_columns.push_back(c);
    }
    auto used = sample_columns;
    for (auto c: row_columns) {
        if (std::find(used.begin(), used.end(), c) == used.end()) used.push_back(c);
    }

    // no duplicated rows (on the sample and row-key dimensions)
    if (n > 1) {
        std::vector<int64_t> sorted(n);
        std::iota(sorted.begin(), sorted.end(), 0);
        auto less = [&](int64_t a, int64_t b) {
            for (auto c: used) {
                auto va = sv[a * width + c];
                auto vb = sv[b * width + c];
                if (va != vb) return va < vb;
            }
            return false;
        };
        std::sort(sorted.begin(), sorted.end(), less);
        for (int64_t k = 1; k < n; k++) {
            if (!less(sorted[k - 1], sorted[k])) return none;
        }
    }

    // the group of every row, and the rows of each group in their order
    auto n_groups = group_keys.size(0);
    auto n_row_keys = static_cast<int64_t>(row_columns.size());
    auto gk = group_keys.contiguous();
    const int32_t* gkp = gk.data_ptr<int32_t>();
    std::vector<int64_t> group(n, 0);
    std::vector<int64_t> counts(n_groups, 0);
    for (int64_t r = 0; r < n; r++) {
        int64_t found = -1;
        if (n_groups == 1 && n_row_keys == 0) {
            found = 0;
        } else {
            for (int64_t g = 0; g < n_groups && found < 0; g++) {
                bool same = true;
                for (int64_t c = 0; c < n_row_keys && same; c++) {
                    same = sv[r * width + row_columns[c]] == gkp[g * n_row_keys + c];
                }
                if (same) found = g;
            }
        }
        if (found < 0) return none;
        group[r] = found;
        counts[found] += 1;
    }
    std::vector<int64_t> start(n_groups + 1, 0);
    for (int64_t g = 0; g < n_groups; g++) start[g + 1] = start[g] + counts[g];
    auto position = torch::empty({n}, torch::kInt64);
    auto* pos = position.data_ptr<int64_t>();
    {
        auto next = start;
        for (int64_t r = 0; r < n; r++) pos[next[group[r]]++] = r;
    }

    // sample labels of every group (unique: checked above)
    auto n_sample = static_cast<int64_t>(sample_columns.size());
    std::vector<metatensor_torch::Labels> group_labels;
    for (int64_t g = 0; g < n_groups; g++) {
        auto values = torch::empty({counts[g], n_sample}, torch::kInt32);
        auto* v = values.data_ptr<int32_t>();
        for (int64_t k = 0; k < counts[g]; k++) {
            auto r = pos[start[g] + k];
            for (int64_t c = 0; c < n_sample; c++) v[k * n_sample + c] = sv[r * width + sample_columns[c]];
        }
        group_labels.push_back(torch::make_intrusive<metatensor_torch::LabelsHolder>(
            torch::IValue(out_names), values, metatensor::assume_unique{}
        ));
    }

    auto n_blocks = static_cast<int64_t>(block_l.size());
    std::vector<int64_t> slots(n_blocks);
    std::iota(slots.begin(), slots.end(), 0);

    if (check_holes) {
        // values in the columns that no block of a row's group holds would be
        // dropped: they must be zero (the detailed path names the culprit)
        auto plan = make_plan(n_blocks, slots, counts, meta, columns, n, x.size(1));
        auto xc = x.contiguous();
        auto dim = x.size(1);
        bool clean = true;
        AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rascaline_e3nn::check_holes", [&] {
            const scalar_t* data = xc.data_ptr<scalar_t>();
            for (int64_t g = 0; g < n_groups && clean; g++) {
                auto holes = holes_of(plan, g, dim);
                for (int64_t k = start[g]; k < start[g + 1] && clean && !holes.empty(); k++) {
                    const scalar_t* row = data + pos[k] * dim;
                    for (const auto& h: holes) {
                        for (int64_t c = h.first; c < h.first + h.second && clean; c++) {
                            clean = row[c] == 0;
                        }
                    }
                }
            }
        });
        if (!clean) return none;
    }

    auto values = from_irreps_autograd(x, slots, position, counts, basis, meta, columns);
    std::vector<metatensor_torch::TensorBlock> blocks;
    for (int64_t t = 0; t < n_blocks; t++) {
        blocks.push_back(torch::make_intrusive<metatensor_torch::TensorBlockHolder>(
            values[t], group_labels[block_group[t]],
            std::vector<metatensor_torch::Labels>{components[block_l[t]]}, properties[t]
        ));
    }
    return {torch::make_intrusive<metatensor_torch::TensorMapHolder>(keys, std::move(blocks))};
}

}  // namespace

TORCH_LIBRARY(rascaline_e3nn, m) {
    m.def(
        "to_irreps(Tensor[] values, int[] slots, Tensor position, int[] group_rows, "
        "Tensor? basis, int[] meta, int[] columns, int dim) -> Tensor",
        &to_irreps_op
    );
    m.def(
        "to_irreps_map(__torch__.torch.classes.metatensor.TensorMap tensor, str[] key_names, "
        "Tensor template_keys, str[] sample_names, str[] property_names, int[] block_l, "
        "int[] block_group, Tensor[] template_properties, Tensor group_keys, bool check, "
        "Tensor? basis, int[] meta, int[] columns, int dim) -> (bool, Tensor)",
        &to_irreps_map
    );
    m.def(
        "samples_map(__torch__.torch.classes.metatensor.TensorMap tensor, str[] key_names, "
        "Tensor template_keys, str[] sample_names, str[] row_key_names, str[] property_names, "
        "int[] block_l, int[] block_group, Tensor[] template_properties, Tensor group_keys, "
        "bool check) -> __torch__.torch.classes.metatensor.Labels[]",
        &samples_map
    );
    m.def(
        "from_irreps_map(Tensor x, __torch__.torch.classes.metatensor.Labels samples, "
        "bool all_samples, str[] sample_names, str[] row_key_names, Tensor group_keys, "
        "__torch__.torch.classes.metatensor.Labels keys, "
        "__torch__.torch.classes.metatensor.Labels[] components, "
        "__torch__.torch.classes.metatensor.Labels[] properties, int[] block_l, "
        "int[] block_group, Tensor? basis, int[] meta, int[] columns, bool check_holes) "
        "-> __torch__.torch.classes.metatensor.TensorMap[]",
        &from_irreps_map
    );
    m.def(
        "from_irreps(Tensor x, int[] slots, Tensor position, int[] group_rows, "
        "Tensor? basis, int[] meta, int[] columns) -> Tensor[]",
        &from_irreps_op
    );
}
