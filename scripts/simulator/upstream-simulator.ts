/**
 * Simulators of the upstreams the gateway leases, for the tests, the benchmark and `npm run demo`:
 * an Ollama server (native + OpenAI-compatible routes), a stablediffusion-fastapi-multigpu server
 * and an OpenAI-compatible speech server. This entry composes the modules of this folder; each
 * imports only from the ones below it (no import cycle):
 *
 *   gpu-recorder.ts   the GPU recorder the servers' work is recorded on
 *   behaviour.ts      faults (Behaviour, Exchange), the recorder hook (Work), delays, deterministic text
 *   http.ts           the node:http server, request recording, body parsing, the handle (Simulator)
 *   ollama-kit.ts     Ollama's state, route kit and wire format
 *   options.ts        SimulatorOptions
 *   ollama-costs.ts   Ollama's runners (loads, eviction, FIFO slots) and the opt-in cost model (prompt cache)
 *   ollama-extras.ts  Ollama's pull stream, Anthropic Messages and OpenAI Responses routes
 *   ollama.ts         the Ollama server and its routes
 *   diffusion.ts      the Stable Diffusion server
 *   speech.ts         the speech server
 */
export { GpuRecorder } from './gpu-recorder.js'
export type { GpuOverlap, GpuEvent, GpuTogether } from './gpu-recorder.js'
export { Exchange, embedVector } from './behaviour.js'
export type { Behaviour } from './behaviour.js'
export { parseMultipart } from './http.js'
export type { Ctx, RecordedRequest, ResidencyEvent, Simulator, UploadedFile } from './http.js'
export type { SimulatorOptions } from './options.js'
export { modelFamily } from './ollama-kit.js'
export type { OllamaRoute, OllamaRouteKit, OllamaState } from './ollama-kit.js'
export { startSimulator } from './ollama.js'
export { crc32, makePng, PNG_SIGNATURE, readPng, startDiffusionSimulator } from './diffusion.js'
export type { CostOptions, CostRecord, CostStats } from './ollama-costs.js'
