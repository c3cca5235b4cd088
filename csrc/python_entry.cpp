// The Python module `sn_kernels._C`: importing it loads the library, whose ops register themselves
// (TORCH_LIBRARY), and gives the eager front ends one direct entry point.
//
// `_C.spectral_normalize_eager(weight, u, v, n_power_iterations, eps, dim, order, training[, coeff, soft[, gain]])`
// calls the op `sn_kernels::native_spectral_normalize_eager` through the dispatcher, exactly as
// `torch.ops.sn_kernels.native_spectral_normalize_eager` does (autograd, tracing, dispatch modes and the
// device's kernel all come from the dispatcher), without the generic binding's work per call: building an
// IValue stack from the schema and matching the arguments against it took about 12 microseconds on a
// 2 GHz core, more than the op itself on a small weight (benchmarks/NOTES.md, P1).
//
// It handles only the common call: plain tensors or parameters (exactly torch.Tensor or one of the types
// given to `_set_plain_types`), no torch function mode or torch.func transform active, a non-empty, real,
// strided weight, and arguments of exactly the schema's Python types.  For anything else (a tensor subclass
// with __torch_function__, a mode, a bool given as dim) it returns NotImplemented and the caller takes its
// other route: torch.ops, which handles every case, or the front end's routes for the weights above.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace sn_kernels {
namespace {

using EagerSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, double,
                                                    int64_t, c10::string_view, bool, std::optional<double>, bool,
                                                    const std::optional<at::Tensor>&);

// the Python types taken as plain tensors besides torch.Tensor (torch.nn.Parameter), set once by the caller
std::vector<PyObject*>& plain_types() {
  static auto* types = new std::vector<PyObject*>();  // strong references, never released
  return *types;
}

bool plain_tensor(PyObject* obj) {
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  if (type == THPVariableClass) return true;
  for (PyObject* t : plain_types())
    if (type == t) return true;
  return false;
}

PyObject* set_plain_types(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (!PyType_Check(args[i]) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(args[i]),
                                                    reinterpret_cast<PyTypeObject*>(THPVariableClass))) {
      PyErr_SetString(PyExc_TypeError, "_set_plain_types takes subclasses of torch.Tensor");
      return nullptr;
    }
  }
  for (PyObject* t : plain_types()) Py_DECREF(t);
  plain_types().clear();
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    Py_INCREF(args[i]);
    plain_types().push_back(args[i]);
  }
  Py_RETURN_NONE;
}

PyObject* spectral_normalize_eager(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if ((nargs != 8 && nargs != 10 && nargs != 11) || THPVariableClass == nullptr ||
      at::impl::torch_function_mode_enabled() || !plain_tensor(args[0]) || !plain_tensor(args[1]) ||
      !plain_tensor(args[2]) || !PyLong_CheckExact(args[3]) || !PyFloat_CheckExact(args[4]) ||
      !PyLong_CheckExact(args[5]) || !PyUnicode_CheckExact(args[6]) || !PyBool_Check(args[7]) ||
      (nargs >= 10 && ((args[8] != Py_None && !PyFloat_CheckExact(args[8])) || !PyBool_Check(args[9]))) ||
      (nargs == 11 && args[10] != Py_None && !plain_tensor(args[10])))
    Py_RETURN_NOTIMPLEMENTED;
  // what the front end's other routes take (functional.normalize_kept): a torch.func transform running (its
  // wrappers are torch.Tensor to Python; functorch includes its front-mode key while its layer stack is not
  // empty), an empty, complex or sparse weight
  const at::Tensor& weight = THPVariable_Unpack(args[0]);
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      weight.numel() == 0 || !weight.is_floating_point() || weight.layout() != at::kStrided)
    Py_RETURN_NOTIMPLEMENTED;
  int overflow = 0;
  const long long n = PyLong_AsLongLongAndOverflow(args[3], &overflow);
  if (overflow != 0) Py_RETURN_NOTIMPLEMENTED;  // torch.ops says what is wrong with it
  const long long dim = PyLong_AsLongLongAndOverflow(args[5], &overflow);
  if (overflow != 0) Py_RETURN_NOTIMPLEMENTED;
  Py_ssize_t len = 0;
  const char* order = PyUnicode_AsUTF8AndSize(args[6], &len);
  if (order == nullptr) return nullptr;
  const double eps = PyFloat_AS_DOUBLE(args[4]);
  const bool training = args[7] == Py_True;
  std::optional<double> coeff;
  bool soft = false;
  if (nargs >= 10) {
    if (args[8] != Py_None) coeff = PyFloat_AS_DOUBLE(args[8]);
    soft = args[9] == Py_True;
  }
  std::optional<at::Tensor> gain;
  if (nargs == 11 && args[10] != Py_None) gain = THPVariable_Unpack(args[10]);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_kernels::native_spectral_normalize_eager", "")
                             .typed<EagerSig>();
  // u and v are the caller's buffers, updated in place (the schema's Tensor(a!)): the same TensorImpl
  at::Tensor u = THPVariable_Unpack(args[1]);
  at::Tensor v = THPVariable_Unpack(args[2]);
  std::tuple<at::Tensor, at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops: the kernels may run long and other threads may call in
    out = op.call(weight, u, v, n, eps, dim, c10::string_view(order, static_cast<size_t>(len)), training, coeff,
                  soft, gain);
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(std::get<0>(out))));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(std::get<1>(out))));
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"spectral_normalize_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&spectral_normalize_eager)),
     METH_FASTCALL,
     "native_spectral_normalize_eager through the dispatcher; NotImplemented where torch.ops must take the call"},
    {"_set_plain_types", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&set_plain_types)), METH_FASTCALL,
     "the Tensor subclasses (torch.nn.Parameter) that spectral_normalize_eager takes as plain tensors"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace sn_kernels

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sn_kernels native ops", -1,
                                          sn_kernels::methods};
  return PyModule_Create(&module_def);
}
