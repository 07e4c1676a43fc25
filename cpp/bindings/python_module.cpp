// babyrt._C: the runtime's Python bindings. The GIL is released while the model runs.
#include <torch/extension.h>

#include <optional>

#include "runtime/model.h"
#include "tokenizer/tokenizer.h"

namespace py = pybind11;
using namespace babyrt;

namespace {

// Exception classes, created once and never freed (they outlive the interpreter's teardown).
PyObject* g_error;
PyObject* g_artifact_error;
PyObject* g_tokenizer_error;
PyObject* g_argument_error;
PyObject* g_device_error;

PyObject* new_exception(py::module_& m, const char* name, PyObject* bases, const char* doc) {
  const std::string qualified = std::string("babyrt._C.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (!cls) throw py::error_already_set();
  m.add_object(name, py::handle(cls));
  return cls;
}

GenerateOptions make_options(int64_t max_new_tokens, float temperature, int64_t top_k,
                             float top_p, uint64_t seed, std::vector<std::string> stop) {
  GenerateOptions o;
  o.max_new_tokens = max_new_tokens;
  o.sampling.temperature = temperature;
  o.sampling.top_k = top_k;
  o.sampling.top_p = top_p;
  o.sampling.seed = seed;
  o.stop = std::move(stop);
  return o;
}

py::dict stats_dict(const GenerationStats& s) {
  py::dict d;
  d["prompt_tokens"] = s.prompt_tokens;
  d["generated_tokens"] = s.generated_tokens;
  d["decode_steps"] = s.decode_steps;
  d["prefill_seconds"] = s.prefill_seconds;
  d["decode_seconds"] = s.decode_seconds;
  d["finish_reason"] = s.finish_reason;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "babyrt C++ runtime";

  g_error = new_exception(m, "Error", PyExc_RuntimeError, "Base class of every babyrt error.");
  g_artifact_error = new_exception(m, "ArtifactError", g_error,
                                   "A missing, truncated or inconsistent artifact.");
  g_tokenizer_error = new_exception(m, "TokenizerError", g_error,
                                    "A bad tokenizer.bin, or text the tokenizer cannot encode.");
  {
    py::tuple bases = py::make_tuple(py::handle(g_error), py::handle(PyExc_ValueError));
    g_argument_error = new_exception(m, "ArgumentError", bases.ptr(),
                                     "A bad argument: sampling values, lengths, prompts.");
  }
  g_device_error =
      new_exception(m, "DeviceError", g_error, "A device that is absent or out of memory.");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ArtifactError& e) {
      PyErr_SetString(g_artifact_error, e.what());
    } catch (const TokenizerError& e) {
      PyErr_SetString(g_tokenizer_error, e.what());
    } catch (const ArgumentError& e) {
      PyErr_SetString(g_argument_error, e.what());
    } catch (const DeviceError& e) {
      PyErr_SetString(g_device_error, e.what());
    } catch (const Error& e) {
      PyErr_SetString(g_error, e.what());
    }
  });

  m.def("version", &version);
  m.def("artifact_format", &artifact_format_json,
        "The artifact format definition this runtime was built with (JSON text).");
  m.def(
      "validate_metadata",
      [](const std::string& json_text) { parse_metadata(json_text, "metadata"); },
      py::arg("json_text"), "Raise ArtifactError unless json_text is valid artifact metadata.");

  py::class_<Tokenizer>(m, "Tokenizer")
      .def(py::init([](py::bytes data, int64_t vocab_size, int64_t bos_id, int64_t eos_id,
                       bool sentencepiece) {
             TokenizerOptions o{vocab_size, bos_id, eos_id, sentencepiece};
             return Tokenizer::from_bytes(std::string(data), o, "tokenizer.bin");
           }),
           py::arg("data"), py::arg("vocab_size"), py::arg("bos_id") = -1,
           py::arg("eos_id") = -1, py::arg("sentencepiece") = true)
      .def("encode", &Tokenizer::encode, py::arg("text"), py::arg("add_bos") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("decode", &Tokenizer::decode, py::arg("ids"))
      .def("piece", &Tokenizer::piece)
      .def("score", &Tokenizer::score)
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size);

  py::class_<Generation>(m, "Generation")
      .def("__iter__", [](Generation& g) -> Generation& { return g; })
      .def("__next__",
           [](Generation& g) {
             std::string piece;
             bool more;
             {
               py::gil_scoped_release release;
               more = g.next(piece);
             }
             if (!more) throw py::stop_iteration();
             return piece;
           })
      .def_property_readonly("stats", [](const Generation& g) { return stats_dict(g.stats()); })
      .def_property_readonly("tokens", &Generation::tokens);

  py::class_<Model, std::shared_ptr<Model>>(m, "Model")
      .def_static(
          "load",
          [](const std::string& path, const std::string& device, const std::string& dtype) {
            py::gil_scoped_release release;
            return Model::load(path, {device, dtype});
          },
          py::arg("path"), py::arg("device") = "cpu", py::arg("dtype") = "")
      .def_property_readonly("metadata_json", [](const Model& s) { return s.metadata().json; })
      .def_property_readonly("device", &Model::device)
      .def_property_readonly("dtype", &Model::dtype)
      .def("encode", &Model::encode, py::arg("text"), py::arg("add_bos"))
      .def("decode", &Model::decode, py::arg("ids"))
      .def(
          "generate",
          [](const Model& s, const std::string& prompt, int64_t max_new_tokens, float temperature,
             int64_t top_k, float top_p, uint64_t seed, std::vector<std::string> stop) {
            const auto o =
                make_options(max_new_tokens, temperature, top_k, top_p, seed, std::move(stop));
            GenerationStats stats;
            std::string text;
            {
              py::gil_scoped_release release;
              text = s.generate(prompt, o, &stats);
            }
            return py::make_tuple(text, stats_dict(stats));
          },
          py::arg("prompt"), py::arg("max_new_tokens"), py::arg("temperature"), py::arg("top_k"),
          py::arg("top_p"), py::arg("seed"), py::arg("stop"))
      .def(
          "start",
          [](const Model& s, const std::string& prompt, int64_t max_new_tokens, float temperature,
             int64_t top_k, float top_p, uint64_t seed, std::vector<std::string> stop) {
            const auto o =
                make_options(max_new_tokens, temperature, top_k, top_p, seed, std::move(stop));
            py::gil_scoped_release release;
            return s.start(prompt, o);
          },
          py::keep_alive<0, 1>(), py::arg("prompt"), py::arg("max_new_tokens"),
          py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"),
          py::arg("stop"))
      .def(
          "logits",
          [](const Model& s, const std::vector<int32_t>& ids, int64_t prefill) {
            Logits l;
            {
              py::gil_scoped_release release;
              l = s.logits(ids, prefill);
            }
            return torch::from_blob(l.data.data(), {l.rows, l.cols}, torch::kFloat).clone();
          },
          py::arg("ids"), py::arg("prefill") = 0)
      .def(
          "generate_batch",
          [](const Model& s, const std::vector<std::string>& prompts, int64_t max_new_tokens,
             float temperature, int64_t top_k, float top_p, uint64_t seed,
             std::vector<std::string> stop) {
            const auto o =
                make_options(max_new_tokens, temperature, top_k, top_p, seed, std::move(stop));
            BatchResult r;
            {
              py::gil_scoped_release release;
              r = s.generate_batch(prompts, o);
            }
            py::list stats;
            for (const auto& st : r.stats) stats.append(stats_dict(st));
            return py::make_tuple(r.texts, stats);
          },
          py::arg("prompts"), py::arg("max_new_tokens"), py::arg("temperature"), py::arg("top_k"),
          py::arg("top_p"), py::arg("seed"), py::arg("stop"));
}
