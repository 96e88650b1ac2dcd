/* One gate's eval-mode decisions in a single call from Python, for float32 tensors on a CPU.

   Average pool, hidden layer, ReLU, heads and the threshold at 0 (gatekit/gate.py, paper Fig. 2) are
   about twenty ATen operator calls, 20-35 us per block at batch 1, against 2-5 us of arithmetic
   (docs/sparse.md, "Where the time goes"). Here they are loops over raw pointers that Python hands
   over as integers (`Tensor.data_ptr()`): no torch headers, so it builds in a second with the C
   compiler that builds Python packages, against any torch. It computes no gradients; the Python side
   calls it only where none is needed (gatekit/_fused_gate.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#define LANES 16 /* independent partial sums: vectorized by the compiler without reassociating */

static float sum_contiguous(const float *values, Py_ssize_t count) {
    float partial[LANES] = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= count; i += LANES)
        for (int lane = 0; lane < LANES; lane++) partial[lane] += values[i + lane];
    float total = 0.0f;
    for (; i < count; i++) total += values[i];
    for (int lane = 0; lane < LANES; lane++) total += partial[lane];
    return total;
}

static float dot(const float *a, const float *b, Py_ssize_t count) {
    float partial[LANES] = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= count; i += LANES)
        for (int lane = 0; lane < LANES; lane++) partial[lane] += a[i + lane] * b[i + lane];
    float total = 0.0f;
    for (; i < count; i++) total += a[i] * b[i];
    for (int lane = 0; lane < LANES; lane++) total += partial[lane];
    return total;
}

/* Channel means of one sample: [channels, positions] (contiguous) or [positions, channels] (channels last). */
static void average_pool(const float *x, Py_ssize_t channels, Py_ssize_t positions, int channels_last, float *pooled) {
    if (channels_last) {
        for (Py_ssize_t c = 0; c < channels; c++) pooled[c] = 0.0f;
        for (Py_ssize_t p = 0; p < positions; p++) {
            const float *row = x + p * channels;
            for (Py_ssize_t c = 0; c < channels; c++) pooled[c] += row[c];
        }
    } else {
        for (Py_ssize_t c = 0; c < channels; c++) pooled[c] = sum_contiguous(x + c * positions, positions);
    }
    const float count = (float)positions;
    for (Py_ssize_t c = 0; c < channels; c++) pooled[c] /= count;
}

static int read_pointers(PyObject *const *args, Py_ssize_t first, Py_ssize_t count, void **pointers) {
    for (Py_ssize_t i = 0; i < count; i++) {
        pointers[i] = PyLong_AsVoidPtr(args[first + i]);
        if (pointers[i] == NULL && PyErr_Occurred()) return -1;
    }
    return 0;
}

static int read_sizes(PyObject *const *args, Py_ssize_t first, Py_ssize_t count, Py_ssize_t *sizes) {
    for (Py_ssize_t i = 0; i < count; i++) {
        sizes[i] = PyLong_AsSsize_t(args[first + i]);
        if (sizes[i] == -1 && PyErr_Occurred()) return -1;
        if (sizes[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "gate kernel: sizes must not be negative");
            return -1;
        }
    }
    return 0;
}

/* Row b of a linear layer's output: bias (or 0) plus weight [outputs, inputs] times values. */
static void linear(const float *weight, const float *bias, const float *values, Py_ssize_t inputs, Py_ssize_t outputs,
                   float *out) {
    for (Py_ssize_t k = 0; k < outputs; k++)
        out[k] = (bias != NULL ? bias[k] : 0.0f) + dot(weight + k * inputs, values, inputs);
}

PyDoc_STRVAR(decide_doc,
"decide(x, fc_weight, fc_bias, channel_weight, channel_bias, layer_weight, layer_bias,\n"
"       batch, in_channels, positions, hidden, channels, channels_last\n"
"       [, channel_logits, channel_gates, layer_logits, layer_gates])\n"
"\n"
"Data pointers (int) of contiguous float32 buffers, then sizes, then optional output pointers; 0 for\n"
"a missing bias, a missing head (channels=0, or layer_weight=0) or an output not wanted. x is [batch, in_channels,\n"
"positions], or [batch, positions, in_channels] with channels_last; fc_weight [hidden, in_channels];\n"
"channel_weight [channels, hidden]; layer_weight [1, hidden]. Writes the logits and the decisions\n"
"(1.0 where a logit is positive, else 0.0): channel ones [batch, channels], layer ones [batch].\n"
"Returns (bits, channels_on, layer_on): one byte per decision (1 = on), row-major [batch, channels\n"
"+ 1 with a layer head]; whether every channel decision is on; whether every layer decision is on.");

static PyObject *decide(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 13 && nargs != 17) {
        PyErr_SetString(PyExc_TypeError, "decide() takes 13 or 17 arguments");
        return NULL;
    }
    void *pointers[11] = {NULL};
    Py_ssize_t sizes[6];
    if (read_pointers(args, 0, 7, pointers) < 0 || read_sizes(args, 7, 6, sizes) < 0) return NULL;
    if (nargs == 17 && read_pointers(args, 13, 4, pointers + 7) < 0) return NULL;
    const float *x = pointers[0], *fc_weight = pointers[1], *fc_bias = pointers[2];
    const float *channel_weight = pointers[3], *channel_bias = pointers[4];
    const float *layer_weight = pointers[5], *layer_bias = pointers[6];
    float *channel_logits = pointers[7], *channel_gates = pointers[8];
    float *layer_logits = pointers[9], *layer_gates = pointers[10];
    const Py_ssize_t batch = sizes[0], in_channels = sizes[1], positions = sizes[2], hidden = sizes[3];
    const Py_ssize_t channels = sizes[4], channels_last = sizes[5];
    const int layered = layer_weight != NULL;
    if (x == NULL || fc_weight == NULL || positions == 0 || (channels > 0 && channel_weight == NULL)) {
        PyErr_SetString(PyExc_ValueError, "gate kernel: missing input, weight or spatial size");
        return NULL;
    }
    const Py_ssize_t row = channels + layered;
    PyObject *bits = PyBytes_FromStringAndSize(NULL, batch * row);
    if (bits == NULL) return NULL;
    float *scratch = malloc(sizeof(float) * (size_t)(in_channels + hidden + channels + 1));
    if (scratch == NULL) {
        Py_DECREF(bits);
        return PyErr_NoMemory();
    }
    float *pooled = scratch, *hidden_values = scratch + in_channels, *logits = hidden_values + hidden;
    char *bit = PyBytes_AS_STRING(bits);
    int channels_on = 1, layer_on = 1;
    for (Py_ssize_t b = 0; b < batch; b++, bit += row) {
        average_pool(x + b * in_channels * positions, in_channels, positions, (int)channels_last, pooled);
        linear(fc_weight, fc_bias, pooled, in_channels, hidden, hidden_values);
        for (Py_ssize_t j = 0; j < hidden; j++)
            if (hidden_values[j] < 0.0f) hidden_values[j] = 0.0f; /* ReLU; a NaN stays NaN, as in torch */
        linear(channel_weight, channel_bias, hidden_values, hidden, channels, logits);
        if (layered) linear(layer_weight, layer_bias, hidden_values, hidden, 1, logits + channels);
        for (Py_ssize_t k = 0; k < row; k++) {
            const int on = logits[k] > 0.0f;
            bit[k] = (char)on;
            if (k < channels) {
                channels_on &= on;
                if (channel_logits != NULL) channel_logits[b * channels + k] = logits[k];
                if (channel_gates != NULL) channel_gates[b * channels + k] = (float)on;
            } else {
                layer_on &= on;
                if (layer_logits != NULL) layer_logits[b] = logits[k];
                if (layer_gates != NULL) layer_gates[b] = (float)on;
            }
        }
    }
    free(scratch);
    return Py_BuildValue("(NOO)", bits, channels_on ? Py_True : Py_False, layer_on ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"decide", (PyCFunction)(void (*)(void))decide, METH_FASTCALL, decide_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_gate_kernel", "A gate's eval-mode decisions in one call (see decide).", -1, methods,
};

PyMODINIT_FUNC PyInit__gate_kernel(void) { return PyModule_Create(&module_definition); }
