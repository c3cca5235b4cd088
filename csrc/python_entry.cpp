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
#include <torch/csrc/utils/object_ptr.h>

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

// the UTF-8 bytes of a str, or nullptr with no error set when it has none (a lone surrogate): torch.ops then
// takes the call and raises its own message for it
const char* utf8(PyObject* str, Py_ssize_t* len) {
  const char* bytes = PyUnicode_AsUTF8AndSize(str, len);
  if (bytes == nullptr) PyErr_Clear();
  return bytes;
}

// a Python int as int64 (false when it does not fit: torch.ops then takes the call and says what is wrong with it)
bool int64_of(PyObject* obj, long long* out) {
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0;
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
  long long n = 0, dim = 0;
  if (!int64_of(args[3], &n) || !int64_of(args[5], &dim)) Py_RETURN_NOTIMPLEMENTED;
  Py_ssize_t len = 0;
  const char* order = utf8(args[6], &len);
  if (order == nullptr) Py_RETURN_NOTIMPLEMENTED;
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
  THPObjectPtr first(THPVariable_Wrap(std::move(std::get<0>(out))));
  if (!first) return nullptr;
  THPObjectPtr second(THPVariable_Wrap(std::move(std::get<1>(out))));
  if (!second) return nullptr;
  return PyTuple_Pack(2, first.get(), second.get());  // its own references (nullptr when it fails)
  END_HANDLE_TH_ERRORS
}

// a Python list of plain tensors as a vector (false: not exactly a list, or an item that is not plain)
bool plain_tensor_list(PyObject* obj, std::vector<at::Tensor>& out) {
  if (!PyList_CheckExact(obj)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(obj, i);
    if (!plain_tensor(item)) return false;
    out.push_back(THPVariable_Unpack(item));
  }
  return true;
}

using GroupEagerSig = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
    at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, int64_t, double, c10::string_view, bool, bool);

// a new list of the tensors as Python objects (nullptr with the error set when one cannot be made; the list made
// so far released, also when THPVariable_Wrap throws)
PyObject* wrap_list(std::vector<at::Tensor>&& tensors) {
  THPObjectPtr list(PyList_New(static_cast<Py_ssize_t>(tensors.size())));
  if (!list) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* item = THPVariable_Wrap(std::move(tensors[i]));
    if (item == nullptr) return nullptr;
    PyList_SET_ITEM(list.get(), static_cast<Py_ssize_t>(i), item);
  }
  return list.release();
}

// `_C.group_normalize_eager(weights, us, vs, dims, n_power_iterations, eps, order, training, shared)`: the op
// `sn_kernels::native_group_normalize_eager` (sn_kernels.group's forward) through the dispatcher, as above: four
// lists of a group's weights converted here, not by torch.ops' binding (benchmarks/NOTES.md, G10).  Exact Python
// types only (lists of plain tensors, a list of ints); NotImplemented otherwise, and under a torch function mode or
// a torch.func transform.
PyObject* group_normalize_eager(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || THPVariableClass == nullptr || at::impl::torch_function_mode_enabled() ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      !PyList_CheckExact(args[3]) || !PyLong_CheckExact(args[4]) || !PyFloat_CheckExact(args[5]) ||
      !PyUnicode_CheckExact(args[6]) || !PyBool_Check(args[7]) || !PyBool_Check(args[8]))
    Py_RETURN_NOTIMPLEMENTED;
  std::vector<at::Tensor> weights, us, vs;
  if (!plain_tensor_list(args[0], weights) || !plain_tensor_list(args[1], us) || !plain_tensor_list(args[2], vs))
    Py_RETURN_NOTIMPLEMENTED;
  const Py_ssize_t count = PyList_GET_SIZE(args[3]);
  std::vector<int64_t> dims(static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* d = PyList_GET_ITEM(args[3], i);
    long long dim = 0;
    if (!PyLong_CheckExact(d) || !int64_of(d, &dim)) Py_RETURN_NOTIMPLEMENTED;
    dims[static_cast<size_t>(i)] = dim;
  }
  long long n = 0;
  if (!int64_of(args[4], &n)) Py_RETURN_NOTIMPLEMENTED;
  Py_ssize_t len = 0;
  const char* order = utf8(args[6], &len);
  if (order == nullptr) Py_RETURN_NOTIMPLEMENTED;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sn_kernels::native_group_normalize_eager", "")
                             .typed<GroupEagerSig>();
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(weights, us, vs, dims, n, PyFloat_AS_DOUBLE(args[5]), c10::string_view(order, static_cast<size_t>(len)),
                  args[7] == Py_True, args[8] == Py_True);
  }
  THPObjectPtr outs(wrap_list(std::move(std::get<0>(out))));
  if (!outs) return nullptr;
  THPObjectPtr sigmas(wrap_list(std::move(std::get<1>(out))));
  if (!sigmas) return nullptr;
  return PyTuple_Pack(2, outs.get(), sigmas.get());
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"group_normalize_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&group_normalize_eager)),
     METH_FASTCALL,
     "native_group_normalize_eager through the dispatcher; NotImplemented where torch.ops must take the call"},
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
