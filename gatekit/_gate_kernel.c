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
"       batch, in_channels, positions, hidden, channels, channels_last)\n"
"\n"
"Data pointers (int) of contiguous float32 buffers, then sizes; 0 for a missing bias or a missing\n"
"head (channels=0, or layer_weight=0). x is [batch, in_channels, positions], or [batch, positions,\n"
"in_channels] with channels_last; fc_weight [hidden, in_channels]; channel_weight [channels, hidden];\n"
"layer_weight [1, hidden].\n"
"Returns (logits, bits, channels_on, layers_on): the logits as float32 bytes and the decisions as\n"
"one byte each (1 where the logit is positive), both row-major [batch, channels + 1 with a layer\n"
"head]; how many channel decisions and how many layer decisions are on.");

static PyObject *decide(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "decide() takes 13 arguments");
        return NULL;
    }
    void *pointers[7];
    Py_ssize_t sizes[6];
    if (read_pointers(args, 0, 7, pointers) < 0 || read_sizes(args, 7, 6, sizes) < 0) return NULL;
    const float *x = pointers[0], *fc_weight = pointers[1], *fc_bias = pointers[2];
    const float *channel_weight = pointers[3], *channel_bias = pointers[4];
    const float *layer_weight = pointers[5], *layer_bias = pointers[6];
    const Py_ssize_t batch = sizes[0], in_channels = sizes[1], positions = sizes[2], hidden = sizes[3];
    const Py_ssize_t channels = sizes[4], channels_last = sizes[5];
    const int layered = layer_weight != NULL;
    if (x == NULL || fc_weight == NULL || positions == 0 || (channels > 0 && channel_weight == NULL)) {
        PyErr_SetString(PyExc_ValueError, "gate kernel: missing input, weight or spatial size");
        return NULL;
    }
    const Py_ssize_t row = channels + layered;
    PyObject *logit_bytes = PyBytes_FromStringAndSize(NULL, batch * row * (Py_ssize_t)sizeof(float));
    PyObject *bits = PyBytes_FromStringAndSize(NULL, batch * row);
    float *scratch = malloc(sizeof(float) * (size_t)(in_channels + hidden));
    if (logit_bytes == NULL || bits == NULL || scratch == NULL) {
        Py_XDECREF(logit_bytes);
        Py_XDECREF(bits);
        free(scratch);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    float *pooled = scratch, *hidden_values = scratch + in_channels;
    float *logits = (float *)PyBytes_AS_STRING(logit_bytes);
    char *bit = PyBytes_AS_STRING(bits);
    Py_ssize_t channels_on = 0, layers_on = 0;
    for (Py_ssize_t b = 0; b < batch; b++, bit += row, logits += row) {
        average_pool(x + b * in_channels * positions, in_channels, positions, (int)channels_last, pooled);
        linear(fc_weight, fc_bias, pooled, in_channels, hidden, hidden_values);
        for (Py_ssize_t j = 0; j < hidden; j++)
            if (hidden_values[j] < 0.0f) hidden_values[j] = 0.0f; /* ReLU; a NaN stays NaN, as in torch */
        linear(channel_weight, channel_bias, hidden_values, hidden, channels, logits);
        if (layered) linear(layer_weight, layer_bias, hidden_values, hidden, 1, logits + channels);
        for (Py_ssize_t k = 0; k < row; k++) {
            const int on = logits[k] > 0.0f; /* a NaN logit is off, as `logits > 0` in torch */
            bit[k] = (char)on;
            if (k < channels)
                channels_on += on;
            else
                layers_on += on;
        }
    }
    free(scratch);
    return Py_BuildValue("(NNnn)", logit_bytes, bits, channels_on, layers_on);
}

static PyMethodDef methods[] = {
    {"decide", (PyCFunction)(void (*)(void))decide, METH_FASTCALL, decide_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_gate_kernel", "A gate's eval-mode decisions in one call (see decide).", -1, methods,
};

PyMODINIT_FUNC PyInit__gate_kernel(void) { return PyModule_Create(&module_definition); }
