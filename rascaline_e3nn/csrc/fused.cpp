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
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif


namespace {

// the small helpers of the row loops: always inlined (a call per run of properties
// costs more than the run)
#define RASCALINE_E3NN_INLINE inline __attribute__((always_inline))

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

// ---------------------------------------------------------------- row programs
//
// to_irreps writes every flat row in one pass, in column order, straight from the
// rows of its blocks (streamed mul_ir units through a per-thread row buffer, written
// out one run of adjacent units at a time), with non-temporal stores when the output
// is large (written once and larger than the caches, ordinary stores would first read
// every line of it; below STREAM_MIN_BYTES ordinary stores leave it cached for the
// next layer).
// from_irreps reads a chunk of flat rows and fills the blocks one after the other, so
// that every block is one sequential stream of (non-temporal) stores.
// Measured on the reference case (benchmarks/README.md): the earlier design (blocks
// copied one after the other into a staging buffer of 16 rows, then each row copied
// out; the same, backwards) cost 1.6-2.2x as much, ordinary stores 1.3-2.5x.
//
// A row is a sequence of units, each writing (reading) a set of its columns:
// - IR_MUL: the blocks of one segment of an ir_mul layout, side by side: for every m,
//   the properties of each block in turn (a run of P columns from each);
// - MUL_IR: consecutive blocks of one segment of a mul_ir layout, each [P, 2l+1]
//   contiguous columns (the transpose of its row);
// - GENERIC: one block with any columns (put_generic / get_generic).
// The change of basis (D_l, sparse: up to 4 entries per row for l = 6) is applied
// on the way, to the block row being read (to_irreps) or written (from_irreps).

enum UnitKind {
    UNIT_IR_MUL = 0,
    UNIT_MUL_IR = 1,
    UNIT_GENERIC = 2,
};

struct Unit {
    UnitKind kind;
    int64_t l;
    int64_t step;                 // IR_MUL: columns from one m to the next
    int64_t props;                // the common number of properties of its blocks,
                                  // 0 when they differ or exceed 16 (read per block)
    std::vector<int64_t> members; // indices in the group's member list
    std::vector<int64_t> firsts;  // the first column of each
    std::vector<int64_t> n_props; // the properties of each
    int64_t run = 0;              // MUL_IR: the columns of all its blocks
    bool stream = false;          // to_irreps: non-temporal stores (aligned columns)
};

// the fast path of an IR_MUL unit handles this many blocks (more: the general one)
constexpr int64_t MAX_UNIT_BLOCKS = 64;

// The units of group g, in the order of their first column (members: plan.by_group[g])
std::vector<Unit> row_program(const Plan& plan, int64_t g) {
    const auto& members = plan.by_group[g];
    std::vector<int64_t> order;
    for (int64_t k = 0; k < static_cast<int64_t>(members.size()); k++) {
        if (plan.blocks[members[k]].n_props > 0) order.push_back(k);
    }
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return plan.blocks[members[a]].first < plan.blocks[members[b]].first;
    });
    std::vector<Unit> units;
    for (auto k: order) {
        const auto& b = plan.blocks[members[k]];
        if (b.run == IR_MUL && !units.empty() && units.back().kind == UNIT_IR_MUL) {
            // another block of the same segment: same l and step, after the previous
            // block and within one m-row of the first
            auto& unit = units.back();
            const auto& head = plan.blocks[members[unit.members.front()]];
            const auto& last = plan.blocks[members[unit.members.back()]];
            if (unit.l == b.l && unit.step == b.step && b.first >= last.first + last.n_props
                && b.first + b.n_props <= head.first + unit.step) {
                unit.members.push_back(k);
                if (unit.props != b.n_props) unit.props = 0;
                continue;
            }
        }
        if (b.run == MUL_IR && !units.empty() && units.back().kind == UNIT_MUL_IR) {
            // the next block of the same segment, right after the previous one
            auto& unit = units.back();
            const auto& last = plan.blocks[members[unit.members.back()]];
            if (unit.l == b.l && b.first == last.first + (2 * last.l + 1) * last.n_props) {
                unit.members.push_back(k);
                if (unit.props != b.n_props) unit.props = 0;
                continue;
            }
        }
        auto kind = b.run == IR_MUL ? UNIT_IR_MUL : (b.run == MUL_IR ? UNIT_MUL_IR : UNIT_GENERIC);
        units.push_back(Unit{kind, b.l, b.step, b.n_props, {k}});
    }
    for (auto& unit: units) {
        if (unit.props > 16) unit.props = 0;
        for (auto k: unit.members) {
            const auto& b = plan.blocks[members[k]];
            unit.firsts.push_back(b.first);
            unit.n_props.push_back(b.n_props);
            unit.run += (2 * b.l + 1) * b.n_props;
        }
    }
    return units;
}

// n values from src to dst; with `stream`, non-temporal stores (dst and n * sizeof(T)
// 16-byte aligned): for outputs too large to stay cached, which ordinary stores would
// first read line by line (streaming_worth)
template <typename T, int N>
RASCALINE_E3NN_INLINE void emit(T* __restrict__ dst, const T* __restrict__ src, int64_t n, bool stream) {
    if (N > 0) n = N;
#if defined(__SSE2__)
    if (stream) {
        auto* d = reinterpret_cast<__m128i*>(dst);
        auto* s = reinterpret_cast<const __m128i*>(src);
        const int64_t chunks = n * static_cast<int64_t>(sizeof(T)) / 16;
        for (int64_t c = 0; c < chunks; c++) _mm_stream_si128(d + c, _mm_loadu_si128(s + c));
        return;
    }
#endif
    for (int64_t k = 0; k < n; k++) dst[k] = src[k];
}

// Software prefetch of `bytes` from p, into L1 (LOCALITY = 3) or L2 (2).
// In a training step the kernels' inputs are not in the caches (the other pass and
// the model evicted them), and the hardware prefetchers do not keep up with the 20-odd
// block streams of a group: prefetching the next rows made the scripted forward +
// backward steps 0.67-0.98x as long, forwards alone 0.73-1.06x (`bench_adapters.py
// --prefetch`, benchmarks/README.md).
template <int LOCALITY>
RASCALINE_E3NN_INLINE void prefetch(const void* p, int64_t bytes) {
#if defined(__GNUC__)
    const char* c = static_cast<const char*>(p);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, LOCALITY);
#endif
}

// One row a of D_l (a few non-zero entries: `count` of them, at columns idx[e] with
// values val[e]), hoisted out of the loops over blocks and rows
template <typename T>
struct DRow {
    const int64_t* idx;
    const T* val;
    int64_t count;
};

template <typename T>
RASCALINE_E3NN_INLINE DRow<T> d_row(const Sparse<T>* D, int64_t a) {
    auto e0 = D->ptr[a];
    return DRow<T>{D->idx.data() + e0, D->val.data() + e0, D->ptr[a + 1] - e0};
}

// out[p] = sum_e val[e] x[idx[e] * stride + p] for p < n: D_l applied to the
// m-components of n properties, in element-wise loops that vectorize
template <typename T, int PF>
RASCALINE_E3NN_INLINE void combine(T* __restrict__ out, const T* __restrict__ x, int64_t n, int64_t stride, DRow<T> d) {
    if (PF > 0) n = PF;
    if (d.count == 0) {
        for (int64_t p = 0; p < n; p++) out[p] = 0;
        return;
    }
    {
        const T v = d.val[0];
        const T* __restrict__ x0 = x + d.idx[0] * stride;
        for (int64_t p = 0; p < n; p++) out[p] = v * x0[p];
    }
    for (int64_t e = 1; e < d.count; e++) {
        const T v = d.val[e];
        const T* __restrict__ xe = x + d.idx[e] * stride;
        for (int64_t p = 0; p < n; p++) out[p] += v * xe[p];
    }
}

// dst[c rows + r] = src[r cols + c] for a small matrix (one block row): 4 x 4 (float)
// or 2 x 2 (double) SSE tiles, scalar edges
RASCALINE_E3NN_INLINE void transpose(const float* __restrict__ src, int64_t rows, int64_t cols, float* __restrict__ dst) {
    int64_t r0 = 0;
#if defined(__SSE2__)
    for (; r0 + 4 <= rows; r0 += 4) {
        int64_t c0 = 0;
        for (; c0 + 4 <= cols; c0 += 4) {
            __m128 a = _mm_loadu_ps(src + (r0 + 0) * cols + c0);
            __m128 b = _mm_loadu_ps(src + (r0 + 1) * cols + c0);
            __m128 c = _mm_loadu_ps(src + (r0 + 2) * cols + c0);
            __m128 d = _mm_loadu_ps(src + (r0 + 3) * cols + c0);
            _MM_TRANSPOSE4_PS(a, b, c, d);
            _mm_storeu_ps(dst + (c0 + 0) * rows + r0, a);
            _mm_storeu_ps(dst + (c0 + 1) * rows + r0, b);
            _mm_storeu_ps(dst + (c0 + 2) * rows + r0, c);
            _mm_storeu_ps(dst + (c0 + 3) * rows + r0, d);
        }
        for (; c0 < cols; c0++) {
            for (int64_t r = r0; r < r0 + 4; r++) dst[c0 * rows + r] = src[r * cols + c0];
        }
    }
#endif
    for (; r0 < rows; r0++) {
        for (int64_t c = 0; c < cols; c++) dst[c * rows + r0] = src[r0 * cols + c];
    }
}

RASCALINE_E3NN_INLINE void transpose(const double* __restrict__ src, int64_t rows, int64_t cols, double* __restrict__ dst) {
    int64_t r0 = 0;
#if defined(__SSE2__)
    for (; r0 + 2 <= rows; r0 += 2) {
        int64_t c0 = 0;
        for (; c0 + 2 <= cols; c0 += 2) {
            __m128d a = _mm_loadu_pd(src + r0 * cols + c0);
            __m128d b = _mm_loadu_pd(src + (r0 + 1) * cols + c0);
            _mm_storeu_pd(dst + c0 * rows + r0, _mm_unpacklo_pd(a, b));
            _mm_storeu_pd(dst + (c0 + 1) * rows + r0, _mm_unpackhi_pd(a, b));
        }
        for (; c0 < cols; c0++) {
            dst[c0 * rows + r0] = src[r0 * cols + c0];
            dst[c0 * rows + r0 + 1] = src[(r0 + 1) * cols + c0];
        }
    }
#endif
    for (; r0 < rows; r0++) {
        for (int64_t c = 0; c < cols; c++) dst[c * rows + r0] = src[r0 * cols + c];
    }
}

// A block with columns in no regular pattern (a GENERIC unit), one row: its values
// (`src`, [2l+1, P], featomic basis) into their columns of `row`; with D, through
// `tmp` (2l+1 x P values): x_e3nn[a] = sum_b D[a, b] x[b]
template <typename T>
RASCALINE_E3NN_INLINE void put_generic(const Block& b, const T* __restrict__ src,
                                       const Sparse<T>* D, T* __restrict__ tmp,
                                       T* __restrict__ row) {
    const int64_t K = 2 * b.l + 1;
    const int64_t P = b.n_props;
    const T* __restrict__ from = src;
    if (D != nullptr) {
        for (int64_t a = 0; a < K; a++) combine<T, 0>(tmp + a * P, src, P, P, d_row(D, a));
        from = tmp;
    }
    for (int64_t p = 0; p < P; p++) {
        T* dst = row + b.columns[2 * p];
        auto step = b.columns[2 * p + 1];
        for (int64_t m = 0; m < K; m++) dst[m * step] = from[m * P + p];
    }
}

// the same, back: the columns of a GENERIC block in `row` into its values (`dst`,
// [2l+1, P], featomic basis); D lists the transpose: x[a] = sum_b D[b, a] x_e3nn[b]
template <typename T>
RASCALINE_E3NN_INLINE void get_generic(const Block& b, const T* __restrict__ row,
                                       const Sparse<T>* D, T* __restrict__ tmp,
                                       T* __restrict__ dst) {
    const int64_t K = 2 * b.l + 1;
    const int64_t P = b.n_props;
    T* __restrict__ into = D != nullptr ? tmp : dst;
    for (int64_t p = 0; p < P; p++) {
        const T* s = row + b.columns[2 * p];
        auto step = b.columns[2 * p + 1];
        for (int64_t m = 0; m < K; m++) into[m * P + p] = s[m * step];
    }
    if (D != nullptr) {
        for (int64_t a = 0; a < K; a++) combine<T, 0>(dst + a * P, tmp, P, P, d_row(D, a));
    }
}

// A unit as the row loops of both kernels read it: plain values and pointers (into
// its Unit and the Plan, which outlive the loops), D resolved once per group. The
// to_irreps loop used to look these up in the Unit's vectors and the Plan for every
// unit of every row; hoisted, the scripted TensorMapToIrreps forward of the reference
// case takes 0.82-0.95x as long with 1 thread, 0.93-0.97x with 2 (old and new loops
// interleaved in one process; the kernel alone 0.77x with 1 thread).
template <typename T>
struct UnitView {
    UnitKind kind;
    int64_t K;               // 2l + 1
    int64_t props;           // the common number of properties (<= 16), or 0
    int64_t step;
    int64_t run;
    int64_t nb;              // blocks
    bool stream;
    bool dense;              // IR_MUL, props > 0: block j at firsts[0] + j props
    const int64_t* members;  // indices in the group's member list
    const int64_t* firsts;
    const int64_t* n_props;
    const Block* block;      // GENERIC: its block
    const Sparse<T>* D;      // nullptr: featomic basis
};

template <typename T>
std::vector<UnitView<T>> views_of(const std::vector<Unit>& units, const Plan& plan,
                                  const std::vector<int64_t>& members,
                                  const std::vector<Sparse<T>>& basis) {
    std::vector<UnitView<T>> views;
    for (const auto& unit: units) {
        UnitView<T> v;
        v.kind = unit.kind;
        v.K = 2 * unit.l + 1;
        v.props = unit.props;
        v.step = unit.step;
        v.run = unit.run;
        v.nb = static_cast<int64_t>(unit.members.size());
        v.stream = unit.stream;
        v.dense = unit.kind == UNIT_IR_MUL && unit.props > 0;
        for (int64_t j = 0; j < v.nb; j++) {
            v.dense = v.dense && unit.firsts[j] == unit.firsts[0] + j * unit.props;
        }
        v.members = unit.members.data();
        v.firsts = unit.firsts.data();
        v.n_props = unit.n_props.data();
        // a GENERIC unit has one block (row_program never adds to one)
        TORCH_CHECK(unit.kind != UNIT_GENERIC || unit.members.size() == 1,
            "rascaline_e3nn: a GENERIC unit with ", unit.members.size(), " blocks");
        v.block = &plan.blocks[members[unit.members[0]]];
        v.D = (!basis.empty() && unit.l >= 1) ? &basis[unit.l] : nullptr;
        views.push_back(v);
    }
    return views;
}

// to_irreps, one unit of one row: `src[k]` is the row of member k ([2l+1, P],
// featomic basis) or nullptr (no entry: zeros); u.D maps it to the e3nn basis
// (x_e3nn[a] = sum_b D[a, b] x[b]) or is nullptr. `work`: max_k * max_props values.
// A streamed MUL_IR unit gets the row buffer as `row` (ordinary stores); scatter_kernel
// then streams it out.
template <typename T, int PF>
RASCALINE_E3NN_INLINE void put_unit(const UnitView<T>& u, const T* const* __restrict__ src,
                                    T* __restrict__ work, T* __restrict__ row) {
    const int64_t K = u.K;
    const bool stream = u.stream;
    const Sparse<T>* D = u.D;
    if (u.kind == UNIT_IR_MUL) {
        const int64_t nb = u.nb;
        if (PF > 0 && nb <= MAX_UNIT_BLOCKS) {
            // the common case, kept tight: every block has this row
            const T* from[MAX_UNIT_BLOCKS];
            bool all = true;
            for (int64_t j = 0; j < nb; j++) {
                from[j] = src[u.members[j]];
                all = all && from[j] != nullptr;
            }
            if (all) {
                const int64_t* firsts = u.firsts;
                if (D == nullptr && u.dense) {
                    // the m-rows of the blocks side by side: one sequential run of stores
                    for (int64_t a = 0; a < K; a++) {
                        T* __restrict__ o = row + firsts[0] + a * u.step;
                        for (int64_t j = 0; j < nb; j++) {
                            emit<T, PF>(o, from[j] + a * PF, PF, stream);
                            o += PF;
                        }
                    }
                    return;
                }
                for (int64_t a = 0; a < K; a++) {
                    T* base = row + a * u.step;
                    if (D == nullptr) {
                        for (int64_t j = 0; j < nb; j++) emit<T, PF>(base + firsts[j], from[j] + a * PF, PF, stream);
                    } else {
                        const auto row_a = d_row(D, a);
                        for (int64_t j = 0; j < nb; j++) {
                            T acc[PF > 0 ? PF : 1];
                            combine<T, PF>(acc, from[j], PF, PF, row_a);
                            emit<T, PF>(base + firsts[j], acc, PF, stream);
                        }
                    }
                }
                return;
            }
        }
        for (int64_t a = 0; a < K; a++) {
            for (int64_t j = 0; j < nb; j++) {
                const T* __restrict__ s = src[u.members[j]];
                const auto P = u.n_props[j];
                T* __restrict__ dst = row + u.firsts[j] + a * u.step;
                if (s == nullptr) {
                    for (int64_t p = 0; p < P; p++) dst[p] = 0;
                } else if (D == nullptr) {
                    for (int64_t p = 0; p < P; p++) dst[p] = s[a * P + p];
                } else {
                    combine<T, 0>(dst, s, P, P, d_row(D, a));
                }
            }
        }
        return;
    }
    if (u.kind == UNIT_MUL_IR) {
        // every block: [P, 2l+1] contiguous columns, the transpose of its row (after
        // D, through `work`)
        T* __restrict__ rotated = work;
        for (int64_t j = 0; j < u.nb; j++) {
            const T* __restrict__ sj = src[u.members[j]];
            const int64_t Pj = PF > 0 ? PF : u.n_props[j];
            T* __restrict__ dst = row + u.firsts[j];
            if (sj == nullptr) {
                for (int64_t c = 0; c < K * Pj; c++) dst[c] = 0;
            } else if (D == nullptr) {
                transpose(sj, K, Pj, dst);
            } else {
                for (int64_t a = 0; a < K; a++) {
                    combine<T, PF>(rotated + a * Pj, sj, Pj, Pj, d_row(D, a));
                }
                transpose(rotated, K, Pj, dst);
            }
        }
        return;
    }
    // GENERIC: the block's columns, wherever they are (`work`: D applied first)
    const T* __restrict__ s = src[u.members[0]];
    if (s == nullptr) {
        const int64_t P = u.block->n_props;
        for (int64_t c = 0; c < K * P; c++) work[c] = 0;
        put_generic<T>(*u.block, work, nullptr, nullptr, row);
    } else {
        put_generic<T>(*u.block, s, D, work, row);
    }
}

// from_irreps, block j of a unit, rows [0, n) of a chunk: the block rows `dst[i]`
// ([2l+1, P], featomic basis; nullptr: no entry for this row) from the columns of the
// flat rows `rows[i]`; u.D lists the transpose (x_featomic[a] = sum_b D[b, a]
// x_e3nn[b]) or is nullptr. Block after block (not row after row as in put_unit):
// every block row is then written in one go, and consecutive rows of a block are
// adjacent, so that each block is one sequential stream of (non-temporal) stores.
// `work`: 2 (2l+1) P values.
template <typename T, int PF>
RASCALINE_E3NN_INLINE void get_member(const UnitView<T>& u, int64_t j, const T* const* __restrict__ rows,
                                      T* const* __restrict__ dst, int64_t n, T* __restrict__ work,
                                      bool stream) {
    const int64_t K = u.K;
    const int64_t P = PF > 0 ? PF : u.n_props[j];
    const int64_t first = u.firsts[j];
    const int64_t step = u.step;
    const Sparse<T>* D = u.D;
    if (u.kind == UNIT_IR_MUL) {
        if (D == nullptr) {
            for (int64_t i = 0; i < n; i++) {
                T* __restrict__ d = dst[i];
                if (d == nullptr) continue;
                const T* __restrict__ row = rows[i] + first;
                for (int64_t a = 0; a < K; a++) emit<T, PF>(d + a * P, row + a * step, P, stream);
            }
        } else {
            for (int64_t i = 0; i < n; i++) {
                T* __restrict__ d = dst[i];
                if (d == nullptr) continue;
                const T* __restrict__ row = rows[i] + first;
                for (int64_t a = 0; a < K; a++) {
                    combine<T, PF>(work, row, P, step, d_row(D, a));
                    emit<T, PF>(d + a * P, work, P, stream);
                }
            }
        }
    } else if (u.kind == UNIT_MUL_IR) {
        // [P, 2l+1] columns, transposed into the block row (then D)
        for (int64_t i = 0; i < n; i++) {
            T* __restrict__ d = dst[i];
            if (d == nullptr) continue;
            const T* __restrict__ row = rows[i] + first;
            T* __restrict__ into = (stream || D != nullptr) ? work : d;
            transpose(row, P, K, into);
            if (D != nullptr) {
                T* __restrict__ rotated = stream ? work + K * P : d;
                for (int64_t a = 0; a < K; a++) {
                    combine<T, PF>(rotated + a * P, work, P, P, d_row(D, a));
                }
                if (stream) emit<T, 0>(d, rotated, K * P, true);
            } else if (stream) {
                emit<T, 0>(d, work, K * P, true);
            }
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            if (dst[i] != nullptr) get_generic<T>(*u.block, rows[i], D, work, dst[i]);
        }
    }
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

// rows of a group per task of at::parallel_for
constexpr int64_t GRAIN = 16;

// to_irreps: the block rows of group row i + PREFETCH_ROWS are prefetched while row i
// is written
constexpr int64_t PREFETCH_ROWS = 2;

// Software prefetching, unless RASCALINE_E3NN_PREFETCH=0 (read at every call: the
// benchmarks compare both in one process, `bench_adapters.py --prefetch`)
bool prefetching_enabled() {
    const char* value = std::getenv("RASCALINE_E3NN_PREFETCH");
    return value == nullptr || std::strcmp(value, "0") != 0;
}

// Non-temporal stores only for outputs of at least this many bytes (default 4 MiB;
// RASCALINE_E3NN_STREAM_MIN_BYTES, read at every call, for `bench_adapters.py
// --stores`). A smaller output stays in the caches for the layer that reads it next
// (ordinary stores: TensorMapToIrreps + a consumer 0.77-0.95x as long at 0.6 and
// 2.4 MB; IrrepsToTensorMap 0.84-0.98x with 1 thread but 1.3-2.4x *longer* with 2 in
// session 5's run, benchmarks/README.md: left as is until both are measured in one
// session), a larger one would not, and ordinary stores then read every line first
// (forward alone 1.2-1.9x as long at 9.4 MB).
constexpr int64_t STREAM_MIN_BYTES = 4 << 20;

bool streaming_worth(int64_t output_bytes) {
    const char* value = std::getenv("RASCALINE_E3NN_STREAM_MIN_BYTES");
    int64_t threshold = STREAM_MIN_BYTES;
    if (value != nullptr && *value != '\0') {
        char* end = nullptr;
        threshold = std::strtoll(value, &end, 10);
        TORCH_CHECK(end != value && *end == '\0' && threshold >= 0,
            "RASCALINE_E3NN_STREAM_MIN_BYTES must be a number of bytes (>= 0), got '", value, "'");
    }
    return output_bytes >= threshold;
}

// from_irreps: rows read in chunks of CHUNK (their flat rows stay cached while every
// block takes its values from them)
constexpr int64_t CHUNK = 16;

// The values of a group's members (blocks): for group row i, member k's row in its
// values, or nullptr when it has no entry (row maps)
template <typename T>
struct MemberRows {
    std::vector<T*> values;
    std::vector<const int64_t*> maps;  // nullptr: every group row, in order
    std::vector<int64_t> sizes;        // values per row

    MemberRows(const Plan& plan, const std::vector<int64_t>& members,
               const std::vector<Tensor>& tensors, const std::vector<const int64_t*>& row_maps) {
        for (auto bi: members) {
            const auto& b = plan.blocks[bi];
            values.push_back(tensors[b.slot].template data_ptr<T>());
            maps.push_back(row_maps[b.slot]);
            sizes.push_back((2 * b.l + 1) * b.n_props);
        }
    }

    T* at(size_t k, int64_t i) const {
        auto r = maps[k] == nullptr ? i : maps[k][i];
        return r < 0 ? nullptr : values[k] + r * sizes[k];
    }
};

// ---------------------------------------------------------------- row loops
//
// The row loops of both kernels, compiled twice: for the baseline x86-64 (SSE2) and,
// where the compiler targets x86, for AVX2 (function attributes, no compiler flag),
// and chosen at every call (kernel_isa). AVX2 only, not FMA: the two versions
// compute the same products and sums in the same order, so their results are equal
// to the bit (tests/test_kernels.py), whichever machine runs them.
// Measured (`bench_adapters.py --isa`, both in one process, benchmarks/isa_*.txt):
// AVX2 / baseline a median 0.92x over the 16 forward and step rows with 2 threads,
// 0.98x with 1 (0.78-1.09x), the e3nn basis (D_l combines) mostly below 1; the
// build takes about twice as long (~2 min here).

enum Isa {
    ISA_BASELINE = 0,
    ISA_AVX2 = 1,
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RASCALINE_E3NN_HAS_AVX2_PATH 1
#define RASCALINE_E3NN_AVX2 __attribute__((target("avx2")))
#else
#define RASCALINE_E3NN_HAS_AVX2_PATH 0
#endif

bool cpu_has_avx2() {
#if RASCALINE_E3NN_HAS_AVX2_PATH
    return __builtin_cpu_supports("avx2");
#else
    return false;
#endif
}

// AVX2 where the CPU has it; RASCALINE_E3NN_ISA=baseline (or avx2) forces one (read
// at every call: the benchmarks and tests compare both in one process)
Isa kernel_isa() {
    const char* value = std::getenv("RASCALINE_E3NN_ISA");
    if (value == nullptr || *value == '\0') {
        return cpu_has_avx2() ? ISA_AVX2 : ISA_BASELINE;
    }
    if (std::strcmp(value, "baseline") == 0) return ISA_BASELINE;
    TORCH_CHECK(std::strcmp(value, "avx2") == 0,
        "RASCALINE_E3NN_ISA must be 'baseline' or 'avx2', got '", value, "'");
    TORCH_CHECK(cpu_has_avx2(), "RASCALINE_E3NN_ISA=avx2, but this CPU (or build) has no AVX2");
    return ISA_AVX2;
}

// What the to_irreps row loop of one row group reads
template <typename T>
struct ScatterGroup {
    const std::vector<UnitView<T>>& views;
    const MemberRows<T>& sources;
    const std::vector<std::pair<int64_t, int64_t>>& holes;  // columns to zero
    const int64_t* rows;  // output row of every group row
    T* out;
    int64_t dim;
    int64_t work_size;    // values of `work`: max_k * max_props
    bool prefetching;
};

// to_irreps, group rows [begin, end)
template <typename T>
RASCALINE_E3NN_INLINE void run_rows(const ScatterGroup<T>& group, int64_t begin, int64_t end) {
    const auto& sources = group.sources;
    std::vector<const T*> src_rows(sources.values.size());
    // the row buffer (dim values from a 64-byte boundary), then `work`
    constexpr int64_t LINE = 64 / sizeof(T);
    const int64_t dim = group.dim;
    std::vector<T> work_values(LINE + dim + group.work_size);
    const T** __restrict__ src = src_rows.data();
    T* buffer = work_values.data();
    buffer += (LINE - (reinterpret_cast<uintptr_t>(buffer) / sizeof(T)) % LINE) % LINE;
    T* __restrict__ work = buffer + dim;
    for (int64_t i = begin; i < end; i++) {
        if (group.prefetching && i + PREFETCH_ROWS < end) {
            for (size_t k = 0; k < sources.values.size(); k++) {
                const T* ahead = sources.at(k, i + PREFETCH_ROWS);
                if (ahead != nullptr) prefetch<3>(ahead, sources.sizes[k] * static_cast<int64_t>(sizeof(T)));
            }
        }
        T* row = group.out + group.rows[i] * dim;
        for (const auto& h: group.holes) {
            std::memset(row + h.first, 0, h.second * sizeof(T));
        }
        for (size_t k = 0; k < sources.values.size(); k++) src[k] = sources.at(k, i);
        // streamed MUL_IR units are transposed into the row buffer, at their
        // columns; each run of adjacent ones is then written in one burst of
        // non-temporal stores. Against unit by unit (bursts of 96-1248 bytes
        // for lmax 6, starting and ending mid-line) the scripted mul_ir
        // forward of the reference case takes a median 0.92x as long in the
        // featomic basis, 0.93x in e3nn's (9 A/B runs interleaved in one
        // process each, 1 and 2 threads; 0.79-1.38x on this noisy host)
        int64_t pending = 0, pending_end = 0;  // buffered columns not yet written
        auto flush = [&]() {
            if (pending_end > pending) emit<T, 0>(row + pending, buffer + pending, pending_end - pending, true);
            pending = pending_end;
        };
        for (const auto& u: group.views) {
            T* into = row;
            if (u.kind == UNIT_MUL_IR && u.stream) {
                if (pending_end != u.firsts[0]) {
                    flush();
                    pending = u.firsts[0];
                }
                pending_end = u.firsts[0] + u.run;
                into = buffer;
            } else {
                flush();
            }
#define RASCALINE_E3NN_PUT(PF) put_unit<T, PF>(u, src, work, into)
            RASCALINE_E3NN_BY_PROPERTIES(u.props, RASCALINE_E3NN_PUT)
#undef RASCALINE_E3NN_PUT
        }
        flush();
    }
}

// What the from_irreps row loop of one row group reads
template <typename T>
struct GatherGroup {
    const std::vector<UnitView<T>>& views;
    const MemberRows<T>& targets;
    const std::vector<char>& stream;  // per member: non-temporal stores
    const T* x;
    const int64_t* rows;  // flat row of every group row
    int64_t dim;
    int64_t work_size;    // values of `work`: 2 max_k max_props
    bool prefetching;
};

// from_irreps, group rows [begin, end)
template <typename T>
RASCALINE_E3NN_INLINE void run_rows(const GatherGroup<T>& group, int64_t begin, int64_t end) {
    std::vector<const T*> rows(CHUNK);
    std::vector<T*> dst(CHUNK);
    std::vector<T> work(group.work_size);
    const T* x = group.x;
    const int64_t dim = group.dim;
    for (int64_t c0 = begin; c0 < end; c0 += CHUNK) {
        auto c1 = std::min(end, c0 + CHUNK);
        for (int64_t i = c0; i < c1; i++) rows[i - c0] = x + group.rows[i] * dim;
        // the next chunk's flat rows, into L2 while this one is read
        for (int64_t i = c1; group.prefetching && i < std::min(end, c1 + CHUNK); i++) {
            prefetch<2>(x + group.rows[i] * dim, dim * static_cast<int64_t>(sizeof(T)));
        }
        for (const auto& u: group.views) {
            for (int64_t j = 0; j < u.nb; j++) {
                auto k = u.members[j];
                for (int64_t i = c0; i < c1; i++) dst[i - c0] = group.targets.at(k, i);
#define RASCALINE_E3NN_GET(PF) get_member<T, PF>(u, j, rows.data(), dst.data(), c1 - c0, work.data(), group.stream[k] != 0)
                RASCALINE_E3NN_BY_PROPERTIES(u.props, RASCALINE_E3NN_GET)
#undef RASCALINE_E3NN_GET
            }
        }
    }
}

// run_rows compiled for each instruction set (Group: ScatterGroup<T> or GatherGroup<T>)
template <typename Group>
void rows_baseline(const Group& group, int64_t begin, int64_t end) {
    run_rows(group, begin, end);
}

#if RASCALINE_E3NN_HAS_AVX2_PATH
template <typename Group>
RASCALINE_E3NN_AVX2 void rows_avx2(const Group& group, int64_t begin, int64_t end) {
    run_rows(group, begin, end);
}
#endif

// The rows [0, n) of one row group, on at::parallel_for's threads, with the row
// loops of `isa`
template <typename Group>
void parallel_rows(const Group& group, int64_t n, Isa isa) {
    auto rows = &rows_baseline<Group>;
#if RASCALINE_E3NN_HAS_AVX2_PATH
    if (isa == ISA_AVX2) rows = &rows_avx2<Group>;
#endif
    at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
        rows(group, begin, end);
#if defined(__SSE2__)
        _mm_sfence();  // this thread's non-temporal stores, before anyone reads them
#endif
    });
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
    int64_t dim,
    bool streaming,
    bool prefetching,
    Isa isa
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
        auto units = row_program(plan, g);
        // non-temporal stores (when streaming) where every run of a unit starts on 16
        // bytes (units with a common number of properties: IR_MUL runs are that long)
        auto aligned = [&](int64_t column) { return (column * static_cast<int64_t>(sizeof(T))) % 16 == 0; };
        bool rows_aligned = streaming && reinterpret_cast<uintptr_t>(out) % 16 == 0 && aligned(dim);
        for (auto& unit: units) {
            unit.stream = rows_aligned && unit.props > 0;
            if (unit.kind == UNIT_IR_MUL) {
                unit.stream = unit.stream && aligned(unit.step) && aligned(unit.props);
                for (auto first: unit.firsts) unit.stream = unit.stream && aligned(first);
            } else if (unit.kind == UNIT_MUL_IR) {
                unit.stream = unit.stream && aligned(unit.firsts[0]) && aligned(unit.run);
            } else {
                unit.stream = false;
            }
        }
        const auto views = views_of<T>(units, plan, members, basis);
        const MemberRows<T> sources(plan, members, values, maps);
        const ScatterGroup<T> group{views, sources, holes, position + plan.group_start[g], out, dim,
                                    plan.max_k * std::max<int64_t>(plan.max_props, 1), prefetching};
        parallel_rows(group, n, isa);
    }
}

template <typename T>
void gather_kernel(
    const Plan& plan,
    const T* x,
    int64_t dim,
    const int64_t* position,
    const std::vector<Sparse<T>>& basis,
    const std::vector<const int64_t*>& maps,
    std::vector<Tensor>& values,
    bool streaming,
    bool prefetching,
    Isa isa
) {
    auto n_groups = static_cast<int64_t>(plan.by_group.size());
    for (int64_t g = 0; g < n_groups; g++) {
        const auto& members = plan.by_group[g];
        auto n = plan.group_rows[g];
        if (n == 0 || members.empty()) {
            continue;
        }
        auto units = row_program(plan, g);
        const auto views = views_of<T>(units, plan, members, basis);
        const MemberRows<T> targets(plan, members, values, maps);
        // non-temporal stores (when streaming) into a block where its rows and runs
        // start on 16 bytes
        auto aligned = [&](int64_t count) { return (count * static_cast<int64_t>(sizeof(T))) % 16 == 0; };
        std::vector<char> stream(members.size(), 0);
        for (const auto& unit: units) {
            for (auto k: unit.members) {
                const auto& b = plan.blocks[members[k]];
                stream[k] = streaming && reinterpret_cast<uintptr_t>(targets.values[k]) % 16 == 0
                    && aligned(targets.sizes[k])
                    && ((unit.kind == UNIT_IR_MUL && aligned(b.n_props)) || unit.kind == UNIT_MUL_IR);
            }
        }
        const GatherGroup<T> group{views, targets, stream, x, position + plan.group_start[g], dim,
                                   2 * plan.max_k * std::max<int64_t>(plan.max_props, 1), prefetching};
        parallel_rows(group, n, isa);
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
        scatter_kernel<scalar_t>(plan, values, maps, pos, D, out.data_ptr<scalar_t>(), dim,
                                 streaming_worth(out.numel() * out.element_size()),
                                 prefetching_enabled(), kernel_isa());
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
        gather_kernel<scalar_t>(plan, x.data_ptr<scalar_t>(), dim, pos, D, maps, values,
                                streaming_worth(x.numel() * x.element_size()),
                                prefetching_enabled(), kernel_isa());
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

// Whether autograd records this call: without it, the kernel runs without the
// custom Function, whose node over every block and saved metadata (copies of the
// column table among them) cost ~20 us a call: a scripted TensorMapToIrreps forward
// on 1 x 8 atoms (63 blocks) took 0.75x as long without, IrrepsToTensorMap 0.85x
bool needs_graph(const std::vector<Tensor>& inputs) {
    const bool recording = at::GradMode::is_enabled();
    for (const auto& t: inputs) {
        if (!t.defined()) continue;
        // forward-mode AD (dual tensors) too: the Function names what it lacks (jvp)
        if (t._fw_grad(/*level=*/0).defined() || (recording && t.requires_grad())) return true;
    }
    return false;
}

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
    if (!needs_graph(values)) {
        return to_irreps_kernel(values, slots, position, group_rows, basis, meta, columns, dim, like, row_maps);
    }
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
    if (!needs_graph({x})) {
        return from_irreps_kernel(x, slots, position, group_rows, basis, meta, columns, row_maps);
    }
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

// The values of a block's Labels on one axis, through metatensor's C++ API: building
// the TorchScript Labels (block->samples(), ...: a LabelsHolder with its tensors, three
// per block) took about a third of a call on small inputs (a 64-atom featomic map)
struct AxisLabels {
    metatensor::Labels labels;  // keeps `values` alive
    const int32_t* values = nullptr;
    int64_t count = 0;
    int64_t size = 0;

    // a copy would clone the handle but keep the original's `values`
    AxisLabels(const AxisLabels&) = delete;
    AxisLabels& operator=(const AxisLabels&) = delete;
    AxisLabels(AxisLabels&&) = default;
    AxisLabels& operator=(AxisLabels&&) = default;

    AxisLabels(const metatensor::TensorBlock& block, uintptr_t axis)
        : labels(block.labels(axis)) {
        const auto array = labels.values_cpu();
        values = array.data();
        count = static_cast<int64_t>(array.shape()[0]);
        size = static_cast<int64_t>(array.shape()[1]);
    }

    bool equals(const int32_t* other, int64_t other_count, int64_t other_size) const {
        return count == other_count && size == other_size
            && (values == other || std::memcmp(values, other, count * size * sizeof(int32_t)) == 0);
    }

    bool equals(const Tensor& other) const {
        if (other.dim() != 2 || other.scalar_type() != torch::kInt32 || !other.device().is_cpu()) {
            return false;
        }
        auto c = other.contiguous();
        return equals(c.data_ptr<int32_t>(), c.size(0), c.size(1));
    }
};

// The values of a block (a view inside its TensorMap), without the TorchScript
// TensorBlock holder: TensorMapHolder::blocks() built one per block and call (~20 us
// of a 63-block call). Undefined when the array does not hold a torch::Tensor.
Tensor block_values(metatensor::TensorBlock& block) {
    static const mts_data_origin_t torch_origin =
        metatensor_torch::TorchDataArray(torch::empty({0})).origin();
    mts_array_t array;
    std::memset(&array, 0, sizeof(array));
    // a reference to the block's array, not a copy: never destroyed here
    metatensor::details::check_status(mts_block_data(block.as_mts_block_t(), &array));
    if (array.ptr == nullptr || array.origin == nullptr) return Tensor();
    mts_data_origin_t origin = 0;
    metatensor::details::check_status(array.origin(array.ptr, &origin));
    if (origin != torch_origin) return Tensor();
    auto* torch_array = dynamic_cast<metatensor_torch::TorchDataArray*>(
        static_cast<metatensor::DataArrayBase*>(array.ptr));
    return torch_array != nullptr ? torch_array->tensor() : Tensor();
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
    auto& map = tensor->as_metatensor();
    std::vector<metatensor::TensorBlock> blocks;
    blocks.reserve(n_in);
    for (int64_t i = 0; i < n_in; i++) blocks.push_back(map.block_by_id(static_cast<uintptr_t>(i)));
    if (!blocks[0].gradients_list().empty()) return not_fast;

    // ---- blocks
    std::vector<Tensor> values;
    std::vector<AxisLabels> block_samples;
    block_samples.reserve(n_in);
    // the samples of every group (its first block's, or the union below)
    std::vector<const int32_t*> samples(n_groups, nullptr);
    std::vector<int64_t> sample_count(n_groups, -1);
    std::vector<bool> shared(n_groups, true);
    auto n_sample_dims = static_cast<int64_t>(sample_names.size());
    auto first_values = block_values(blocks[0]);
    if (!first_values.defined()) return not_fast;
    auto dtype = first_values.scalar_type();
    if (dtype != torch::kFloat32 && dtype != torch::kFloat64) return not_fast;
    for (int64_t i = 0; i < n_in; i++) {
        auto t = slots[i];
        auto& block = blocks[i];
        auto value = i == 0 ? first_values : block_values(block);
        auto l = block_l[t];
        if (!value.defined() || value.dim() != 3 || value.size(1) != 2 * l + 1 || !value.device().is_cpu()
            || value.scalar_type() != dtype) {
            return not_fast;
        }
        if (check) {
            AxisLabels mu(block, 1);
            if (mu.count != 2 * l + 1 || mu.size != 1) return not_fast;
            for (int64_t k = 0; k < 2 * l + 1; k++) {
                if (mu.values[k] != k - l) return not_fast;
            }
        }
        if (!AxisLabels(block, 2).equals(template_properties[t])) return not_fast;
        block_samples.emplace_back(block, 0);
        const auto& mine = block_samples.back();
        if (mine.size != n_sample_dims) return not_fast;
        auto g = block_group[t];
        if (sample_count[g] < 0) {
            samples[g] = mine.values;
            sample_count[g] = mine.count;
        } else if (!mine.equals(samples[g], sample_count[g], n_sample_dims)) {
            shared[g] = false;
        }
        values.push_back(value);
    }

    // ---- groups whose blocks have different samples (featomic gives them for
    // centers without neighbours of some type): rows are the sorted union, each
    // block placed by a row map, zeros where it has no entry
    std::vector<Tensor> row_maps(n_in);
    std::vector<std::vector<int32_t>> unions(n_groups);
    for (int64_t g = 0; g < n_groups; g++) {
        if (shared[g]) continue;
        std::vector<int64_t> members;
        for (int64_t i = 0; i < n_in; i++) {
            if (block_group[slots[i]] == g) members.push_back(i);
        }
        std::vector<const int32_t*> member_samples;
        std::vector<int64_t> member_rows;
        for (auto i: members) {
            member_samples.push_back(block_samples[i].values);
            member_rows.push_back(block_samples[i].count);
        }
        auto less_row = [&](const int32_t* a, const int32_t* b) {
            for (int64_t c = 0; c < n_sample_dims; c++) {
                if (a[c] != b[c]) return a[c] < b[c];
            }
            return false;
        };
        auto same_row = [&](const int32_t* a, const int32_t* b) {
            return std::equal(a, a + n_sample_dims, b);
        };
        // every member's samples strictly increasing (and rows to compare)
        bool increasing = n_sample_dims > 0;
        for (size_t j = 0; j < members.size() && increasing; j++) {
            for (int64_t r = 1; r < member_rows[j] && increasing; r++) {
                increasing = less_row(member_samples[j] + (r - 1) * n_sample_dims,
                                      member_samples[j] + r * n_sample_dims);
            }
        }
        std::vector<int32_t> union_values;
        std::vector<std::vector<int64_t>> maps(members.size());
        int64_t u = -1;
        if (increasing) {
            // featomic's case: merge the sorted lists one after the other (linear in
            // the union per member), then walk every member along the union
            std::vector<int32_t> merged;
            for (size_t j = 0; j < members.size(); j++) {
                merged.clear();
                const int32_t* x = union_values.data();
                const int32_t* y = member_samples[j];
                int64_t nx = static_cast<int64_t>(union_values.size()) / std::max<int64_t>(n_sample_dims, 1);
                int64_t ny = member_rows[j];
                int64_t ix = 0, iy = 0;
                while (ix < nx || iy < ny) {
                    const int32_t* rx = x + ix * n_sample_dims;
                    const int32_t* ry = y + iy * n_sample_dims;
                    if (iy == ny || (ix < nx && less_row(rx, ry))) {
                        merged.insert(merged.end(), rx, rx + n_sample_dims);
                        ix++;
                    } else {
                        if (ix < nx && same_row(rx, ry)) ix++;  // the same row in both
                        merged.insert(merged.end(), ry, ry + n_sample_dims);
                        iy++;
                    }
                }
                union_values.swap(merged);
            }
            u = static_cast<int64_t>(union_values.size()) / std::max<int64_t>(n_sample_dims, 1) - 1;
            for (size_t j = 0; j < members.size(); j++) {
                maps[j].assign(u + 1, -1);
                int64_t r = 0;
                for (int64_t k = 0; k <= u && r < member_rows[j]; k++) {
                    if (same_row(member_samples[j] + r * n_sample_dims, union_values.data() + k * n_sample_dims)) {
                        maps[j][k] = r++;
                    }
                }
            }
        } else {
            // every (member, row), sorted by sample values then member
            std::vector<std::pair<int64_t, int64_t>> refs;
            for (int64_t j = 0; j < static_cast<int64_t>(members.size()); j++) {
                for (int64_t r = 0; r < member_rows[j]; r++) refs.emplace_back(j, r);
            }
            auto row_of = [&](const std::pair<int64_t, int64_t>& ref) {
                return member_samples[ref.first] + ref.second * n_sample_dims;
            };
            std::sort(refs.begin(), refs.end(), [&](const auto& a, const auto& b) {
                if (same_row(row_of(a), row_of(b))) return a.first < b.first;
                return less_row(row_of(a), row_of(b));
            });
            for (size_t k = 0; k < refs.size(); k++) {
                if (k == 0 || !same_row(row_of(refs[k - 1]), row_of(refs[k]))) {
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
        }
        auto n_union = u + 1;
        unions[g] = std::move(union_values);
        samples[g] = unions[g].data();
        sample_count[g] = n_union;
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
        group_rows[g] = std::max<int64_t>(sample_count[g], 0);
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
        const int32_t* sp = samples[g];
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
    // the rows of a group are usually in order already (featomic's samples are sorted,
    // the row keys constant within a group): then a stable merge of the groups' runs,
    // pair after pair, the same order as the stable sort in n log(groups) comparisons
    // (16 x 125 atoms, 3 groups: 13 us instead of 33, timed in the kernel)
    bool runs_sorted = true;
    for (int64_t g = 0; g < n_groups && runs_sorted; g++) {
        for (int64_t r = group_start[g] + 1; r < group_start[g + 1] && runs_sorted; r++) {
            runs_sorted = !less(r, r - 1);
        }
    }
    if (runs_sorted) {
        for (int64_t span = 1; span < n_groups; span *= 2) {
            for (int64_t g = 0; g + span < n_groups; g += 2 * span) {
                auto middle = group_start[g + span];
                auto stop = group_start[std::min(n_groups, g + 2 * span)];
                std::inplace_merge(order.begin() + group_start[g], order.begin() + middle,
                                   order.begin() + stop, less);
            }
        }
    } else {
        std::stable_sort(order.begin(), order.end(), less);
    }
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

// The Labels of the collected rows (samples, then the row keys), in their order; none
// when the case is not common or the rows are not unique
std::vector<metatensor_torch::Labels> row_labels(
    const Collected& c,
    const std::vector<std::string>& sample_names,
    const std::vector<std::string>& row_key_names
) {
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
    return row_labels(c, sample_names, row_key_names);
}

// to_irreps_map and samples_map in one call (TensorMapToIrreps.forward_with_samples):
// the metadata work is done once
std::tuple<bool, Tensor, std::vector<metatensor_torch::Labels>> to_irreps_samples_map(
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
    bool check,
    const c10::optional<Tensor>& basis,
    c10::IntArrayRef meta,
    c10::IntArrayRef columns,
    int64_t dim
) {
    auto c = collect_map(tensor, key_names, template_keys, sample_names, property_names,
                         block_l, block_group, template_properties, group_keys, check);
    if (!c.ok) {
        return std::make_tuple(false, torch::empty({0}), std::vector<metatensor_torch::Labels>{});
    }
    auto labels = row_labels(c, sample_names, row_key_names);
    auto out = to_irreps_autograd(c.values, c.slots, c.position, c.group_rows, basis, meta, columns, dim, c.row_maps);
    return std::make_tuple(true, out, labels);
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
        "to_irreps_samples_map(__torch__.torch.classes.metatensor.TensorMap tensor, "
        "str[] key_names, Tensor template_keys, str[] sample_names, str[] row_key_names, "
        "str[] property_names, int[] block_l, int[] block_group, Tensor[] template_properties, "
        "Tensor group_keys, bool check, Tensor? basis, int[] meta, int[] columns, int dim) "
        "-> (bool, Tensor, __torch__.torch.classes.metatensor.Labels[])",
        &to_irreps_samples_map
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
    // which row loops the kernels run now (RASCALINE_E3NN_ISA, or what the CPU has)
    m.def("kernel_isa() -> str", []() -> std::string {
        return kernel_isa() == ISA_AVX2 ? "avx2" : "baseline";
    });
}
