/** The options the simulators' start functions take (each reads the ones that apply to it). */
import type { ServerOptions } from './http.js'
import type { OllamaRoute } from './ollama-kit.js'
import type { CostOptions } from './ollama-costs.js'

/** port, gpuIds, recorder and cancelDelayMs: see ServerOptions */
export interface SimulatorOptions extends ServerOptions {
  /** what GET /api/tags, /api/ps and /v1/models list (default ['llama3.2:latest']) */
  models?: string[]
  /** tokens per generate/chat answer (default 5) */
  tokens?: number
  /** delay before each token (default 10) */
  tokenDelayMs?: number
  /** default 768 (nomic-embed-text's size; with 4-byte floats, far over Go's 2 KB before chunking) */
  embedDims?: number
  /** default '0.33.0' */
  version?: string
  /** default true: an empty 403 unless Host is localhost, loopback, a private IP, ... like Ollama on loopback */
  hostCheck?: boolean
  /** time a txt2img / img2img takes (default 20) */
  imageDelayMs?: number
  /** Ollama: OLLAMA_NUM_PARALLEL, requests one loaded model runs at once (default 1); more wait inside the server */
  numParallel?: number
  /** Ollama: time a model that is not resident takes to load before its first token (default 20) */
  loadMs?: number
  /** Ollama: OLLAMA_MAX_LOADED_MODELS (default 3); loading one more evicts the least recently used idle model */
  maxLoadedModels?: number
  /** Ollama: OLLAMA_KEEP_ALIVE, how long a model stays resident after its last request when the request names none (default 5 min) */
  keepAliveMs?: number
  /** Ollama: models resident when the server starts (default none, like a fresh `ollama serve`) */
  resident?: string[]
  /**
   * Ollama: what a request costs, opt-in (see CostOptions): prompt tokens, a prompt cache per model
   * (slots + RAM), prefill per computed token, decode per answer token, Ollama's counts on the
   * final line and in usage. Without it: a fixed delay per token, no cache, fixed counts.
   */
  cost?: CostOptions
  /** Ollama: routes tried before the built-in ones (see OllamaRoute) */
  routes?: OllamaRoute[]
}

