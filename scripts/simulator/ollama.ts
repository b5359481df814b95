/**
 * The simulated Ollama server (native API and OpenAI-compatible routes; the pull stream and the
 * Anthropic / Responses APIs come from ollama-extras.ts): model runners with loads, eviction,
 * keep-alive and OLLAMA_NUM_PARALLEL slots (requests beyond them wait inside the server), Ollama's
 * host check, and its answers as they look on the wire (Ollama v0.33).
 *
 * Every POST that does model work is recorded on a GpuRecorder: `enter` when the request's headers
 * and body have arrived, `exit` (exactly once) just before `res.end()` or when the socket closes.
 */
import { isIP } from 'node:net'
import os from 'node:os'
import { performance } from 'node:perf_hooks'
import { randomInt } from 'node:crypto'
import { Exchange, openAiError, preempted, sleep, tokensFor, embedVector, float32Base64, promptTokens } from './behaviour.js'
import { beginWork, startServer, tryJson, type Ctx, type Simulator } from './http.js'
import type { SimulatorOptions } from './options.js'
import { OLLAMA_EXTRA_ROUTES } from './ollama-extras.js'
import { answerTokens, chatTurns, CostModel, ModelRunners, renderPrompt, type CostRecord, type Turn } from './ollama-costs.js'
import {
  JSON_TYPE, NDJSON_TYPE, SSE_TYPE, MODIFIED_AT, WIRE, modelKey, displayName, digestOf, modelDetails, modelSize, bindGo, keepAliveMs,
  contextTokens, errorJson, okJson, infoJson, bindNative, v1Error, bindOpenAi, sse, created, numPredict, durations,
  type Answer, type OllamaState, type OllamaRouteKit, type OllamaRoute, type Handler
} from './ollama-kit.js'

/** Ollama's allowedHostsMiddleware for a server listening on loopback. */
function allowedHost (hostHeader: string | undefined): boolean {
  if (hostHeader === undefined || hostHeader === '') return true
  let host = hostHeader.toLowerCase()
  const bracket = /^\[([^\]]+)\](?::\d+)?$/.exec(host)
  if (bracket !== null) host = bracket[1]
  else if (/^[^:]+:\d*$/.test(host)) host = host.slice(0, host.lastIndexOf(':'))
  if (isIP(host) !== 0) return isLocalIp(host)
  if (host === 'localhost' || host === os.hostname().toLowerCase()) return true
  return ['.localhost', '.local', '.internal'].some(tld => host.endsWith(tld))
}

function isLocalIp (ip: string): boolean {
  if (isIP(ip) === 4) {
    const [a, b] = ip.split('.').map(Number)
    if (a === 127 || a === 10 || ip === '0.0.0.0') return true
    if (a === 172 && b >= 16 && b <= 31) return true
    if (a === 192 && b === 168) return true
  } else {
    const v6 = ip.toLowerCase()
    if (v6 === '::1' || v6 === '::') return true
    if (/^f[cd][0-9a-f]{2}:/.test(v6)) return true
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(v6)
    if (mapped !== null) return isLocalIp(mapped[1])
  }
  for (const addrs of Object.values(os.networkInterfaces())) {
    for (const a of addrs ?? []) if (a.address.toLowerCase() === ip.toLowerCase()) return true
  }
  return false
}

/** Routes from other modules, tried before the built-in ones (they may replace one). */
const EXTRA_OLLAMA_ROUTES: OllamaRoute[] = [...OLLAMA_EXTRA_ROUTES]

export async function startSimulator (opts: SimulatorOptions = {}): Promise<Simulator> {
  const cost = opts.cost
  const numParallel = Math.max(1, cost?.slots ?? opts.numParallel ?? 1)
  const st: OllamaState = {
    models: [...(opts.models ?? ['llama3.2:latest'])],
    tokens: opts.tokens ?? 5,
    tokenDelayMs: opts.tokenDelayMs ?? 10,
    embedDims: opts.embedDims ?? 768,
    version: opts.version ?? '0.33.0',
    hostCheck: opts.hostCheck ?? true,
    numParallel,
    keepAliveMs: opts.keepAliveMs ?? 5 * 60_000,
    runners: new ModelRunners({
      numParallel,
      loadMs: cost?.loadMs ?? opts.loadMs ?? 20,
      maxLoadedModels: Math.max(1, cost?.maxLoadedModels ?? opts.maxLoadedModels ?? 3)
    }),
    cost: cost === undefined
      ? null
      : new CostModel({
        prefillMsPerToken: cost.prefillMsPerToken,
        decodeMsPerToken: cost.decodeMsPerToken,
        slots: numParallel,
        ramCacheEntries: cost.ramCacheEntries ?? 4,
        answerTokens: cost.answerTokens ?? opts.tokens ?? 5
      })
  }
  const { runners } = st
  runners.onDrop = key => st.cost?.dropModel(key)
  for (const m of opts.resident ?? []) runners.seed(modelKey(m), residentName(st, m))
  const routes = [...(opts.routes ?? []), ...EXTRA_OLLAMA_ROUTES, ...OLLAMA_ROUTES]
  const sim = await startServer({ ...opts, cancelDelayMs: opts.cancelDelayMs ?? st.tokenDelayMs }, ctx => tryJson(ctx.text), ctx => ollamaRoute(st, routes, ctx))
  sim.loads = runners.loads
  sim.unloads = runners.unloads
  sim.resident = () => { runners.expire(); return [...runners.resident.values()].map(r => r.name) }
  sim.running = () => runners.running()
  const noCost = new CostModel({ prefillMsPerToken: 0, decodeMsPerToken: 0, slots: 1, ramCacheEntries: 0, answerTokens: 0 })
  sim.costs = () => (st.cost ?? noCost).stats(runners.loads)
  return sim
}

/** The name a resident model is listed under: the server's own spelling of it. */
function residentName (st: OllamaState, model: string): string {
  return displayName(st.models.find(m => modelKey(m) === modelKey(model)) ?? model)
}

function keepAliveUntil (st: OllamaState, keepAlive: unknown): number {
  const ms = keepAliveMs(keepAlive) ?? st.keepAliveMs
  return ms < 0 ? Infinity : Date.now() + ms
}

function kitFor (st: OllamaState, ctx: Ctx, ex: Exchange): OllamaRouteKit {
  const arrivedAt = performance.now()
  let startedAt = arrivedAt
  let loaded = false
  const known = (m: string): boolean => st.models.some(x => modelKey(x) === modelKey(m))
  const unload = (model: string): void => st.runners.unload(modelKey(model))
  const run = async (model: string, body: Record<string, any>): Promise<boolean> => {
    const numCtx = typeof body.options?.num_ctx === 'number' ? body.options.num_ctx : 4096
    const key = modelKey(model)
    const got = await st.runners.acquire(key, residentName(st, model), numCtx)
    startedAt = performance.now()
    loaded = got.loaded
    ex.onDone(() => st.runners.release(key, got.runner, keepAliveUntil(st, body.keep_alive)))
    return ex.alive
  }
  const answer = async (model: string, turns: () => Turn[], promptCount: number, limit: number | undefined): Promise<Answer> => {
    const cost = st.cost
    if (cost === null) {
      const { words, reason } = tokensFor(limit, st.tokens)
      return {
        words,
        reason,
        tokenDelayMs: st.tokenDelayMs,
        promptTokens: promptCount,
        cachedTokens: 0,
        cost: false,
        durations: () => durations(st, words.length, promptCount),
        openAiUsage: () => ({ prompt_tokens: promptCount, completion_tokens: words.length, total_tokens: promptCount + words.length }),
        anthropicUsage: (output) => ({ input_tokens: promptCount, output_tokens: output })
      }
    }
    return await costedAnswer(cost, { model, route: ctx.path, ex, arrivedAt, startedAt, loadMs: loaded ? st.runners.opts.loadMs : 0 }, turns(), limit)
  }
  return { st, ctx, ex, known, run, unload, answer, wire: WIRE }
}

/** The cost model's answer: the prefix cache claimed, the prefill waited for, the counts recorded. */
async function costedAnswer (
  cost: CostModel,
  req: { model: string, route: string, ex: Exchange, arrivedAt: number, startedAt: number, loadMs: number },
  turns: Turn[],
  limit: number | undefined
): Promise<Answer> {
  const { prefillMsPerToken, decodeMsPerToken, answerTokens: total } = cost.opts
  const prompt = renderPrompt(turns)
  const cache = cost.cacheFor(modelKey(req.model))
  const claim = cache.claim(prompt)
  const n = limit !== undefined && limit >= 0 && limit < total ? limit : total
  const words = answerTokens(prompt, n)
  // the slot keeps what was computed in it: the prompt and the answer
  req.ex.onDone(() => cache.release(claim.slot, [...prompt, ...words]))
  const computed = prompt.length - claim.cached
  const prefillMs = computed * prefillMsPerToken
  await sleep(prefillMs)
  const record: CostRecord = {
    model: req.model,
    route: req.route,
    promptTokens: prompt.length,
    cachedTokens: claim.cached,
    computedTokens: computed,
    cacheSource: claim.source,
    loadMs: req.loadMs,
    prefillMs,
    evalCount: words.length,
    arrivedAt: req.arrivedAt,
    startedAt: req.startedAt,
    ttftMs: performance.now() - req.arrivedAt + (words.length > 0 ? decodeMsPerToken : 0)
  }
  cost.records.push(record)
  const ns = (ms: number): number => Math.round(ms * 1e6)
  const cached = claim.cached
  return {
    words,
    reason: n < total ? 'length' : 'stop',
    tokenDelayMs: decodeMsPerToken,
    promptTokens: prompt.length,
    cachedTokens: cached,
    cost: true,
    durations: () => {
      const modelNs = ns(req.loadMs) + ns(prefillMs) + ns(words.length * decodeMsPerToken)
      return {
        // from arrival: waiting inside the server counts too, as in Ollama
        total_duration: Math.max(modelNs, ns(performance.now() - req.arrivedAt)),
        load_duration: ns(req.loadMs),
        prompt_eval_count: prompt.length,
        // omitted when 0, as Ollama does
        ...(cached > 0 ? { prompt_eval_cached_count: cached } : {}),
        prompt_eval_duration: ns(prefillMs),
        eval_count: words.length,
        eval_duration: ns(words.length * decodeMsPerToken)
      }
    },
    openAiUsage: () => ({
      prompt_tokens: prompt.length,
      completion_tokens: words.length,
      total_tokens: prompt.length + words.length,
      prompt_tokens_details: { cached_tokens: cached }
    }),
    anthropicUsage: (output) => ({ input_tokens: prompt.length, output_tokens: output, cache_read_input_tokens: cached })
  }
}

const pathMatches = (route: OllamaRoute, path: string): boolean => typeof route.path === 'string' ? route.path === path : route.path.test(path)
const methodMatches = (route: OllamaRoute, method: string): boolean => Array.isArray(route.method) ? route.method.includes(method) : route.method === method

function ollamaRoute (st: OllamaState, routes: OllamaRoute[], ctx: Ctx): void {
  const { res, method, path } = ctx
  if (st.hostCheck && !allowedHost(ctx.req.headers.host)) {
    res.writeHead(403, { 'Content-Length': 0 })
    res.end()
    return
  }
  const route = routes.find(r => pathMatches(r, path) && methodMatches(r, method))
  if (route === undefined) {
    // gin with HandleMethodNotAllowed (as Ollama sets it), then its NoRoute
    const text = routes.some(r => pathMatches(r, path)) ? '405 method not allowed' : '404 page not found'
    res.writeHead(text.startsWith('405') ? 405 : 404, { 'Content-Type': 'text/plain', 'Content-Length': text.length })
    res.end(text)
    return
  }
  let ex: Exchange
  if (route.work) {
    const parsed = tryJson(ctx.text) as Record<string, unknown> | undefined
    const model = parsed !== null && typeof parsed === 'object' && typeof parsed.model === 'string' ? parsed.model : ''
    ex = beginWork(ctx, path, model, st.numParallel)
    if (preempted(ex, JSON_TYPE)) return
  } else ex = new Exchange(ctx.res, { kind: 'normal' }, null)
  Promise.resolve(route.handle(kitFor(st, ctx, ex))).catch((err: unknown) => {
    if (ex.res.headersSent) ex.res.destroy()
    else ex.plain(500, { 'Content-Type': JSON_TYPE }, JSON.stringify({ error: String(err) }))
  })
}

const OLLAMA_INFO_ROUTES: OllamaRoute[] = [
  {
    method: ['GET', 'HEAD'],
    path: '/',
    work: false,
    handle: ({ ex }) => ex.plain(200, { 'Content-Type': 'text/plain; charset=utf-8' }, 'Ollama is running')
  },
  { method: ['GET', 'HEAD'], path: '/api/version', work: false, handle: ({ st, ex }) => infoJson(ex, 200, { version: st.version }) },
  {
    method: ['GET', 'HEAD'],
    path: '/api/tags',
    work: false,
    handle: ({ st, ex }) => infoJson(ex, 200, {
      models: st.models.map(m => ({ name: displayName(m), model: displayName(m), modified_at: MODIFIED_AT, size: modelSize(m), digest: digestOf(m), details: modelDetails(m) }))
    })
  },
  {
    method: 'GET',
    path: '/api/ps',
    work: false,
    handle: ({ st, ex }) => {
      st.runners.expire()
      infoJson(ex, 200, {
        models: [...st.runners.resident.values()].map(r => ({
          name: r.name,
          model: r.name,
          size: modelSize(r.name),
          digest: digestOf(r.name),
          details: modelDetails(r.name),
          // a running model expires keep-alive after its requests end; until then, as of now
          expires_at: new Date(Number.isFinite(r.expiresAt) ? r.expiresAt : Date.now() + 292 * 365 * 86_400_000).toISOString(),
          size_vram: modelSize(r.name),
          context_length: r.contextLength
        }))
      })
    }
  },
  {
    method: 'POST',
    path: '/api/show',
    work: false,
    handle: ({ st, ctx, ex, known }) => {
      const bound = bindGo(ctx.text, 'api.ShowRequest', { name: ['string', 'string'], verbose: ['bool', 'bool'] })
      if ('error' in bound) return infoJson(ex, 400, { error: bound.eof === true ? 'missing request body' : bound.error })
      const model: string = bound.body.model ?? bound.body.name ?? ''
      if (model === '') return infoJson(ex, 400, { error: 'model is required' })
      if (!known(model)) return infoJson(ex, 404, { error: `model '${model}' not found` })
      infoJson(ex, 200, {
        license: 'Simulated license',
        modelfile: `# Modelfile generated by the simulator\nFROM ${displayName(model)}\n`,
        parameters: 'stop "<|eot_id|>"',
        template: '{{ .Prompt }}',
        details: modelDetails(model),
        model_info: { 'general.architecture': 'llama', 'general.parameter_count': 3_212_749_888, 'llama.context_length': 131072, 'llama.embedding_length': st.embedDims },
        capabilities: ['completion', 'tools'],
        modified_at: MODIFIED_AT
      })
    }
  },
  {
    method: ['GET', 'HEAD'],
    path: '/v1/models',
    work: false,
    handle: ({ st, ex }) => infoJson(ex, 200, { object: 'list', data: st.models.map(m => ({ id: displayName(m), object: 'model', created: 1735689600, owned_by: 'library' })) })
  },
  {
    method: 'GET',
    path: /^\/v1\/models\/[^/]+$/,
    work: false,
    handle: ({ ctx, ex, known }) => {
      let model = ctx.path.slice('/v1/models/'.length)
      try { model = decodeURIComponent(model) } catch {}
      if (!known(model)) return infoJson(ex, 404, openAiError(404, `model '${model}' not found`))
      infoJson(ex, 200, { id: model, object: 'model', created: 1735689600, owned_by: 'library' })
    }
  }
]

const generate: Handler = async (kit) => {
  const { ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.GenerateRequest', {
    prompt: ['string', 'string'], suffix: ['string', 'string'], system: ['string', 'string'], template: ['string', 'string'],
    raw: ['bool', 'bool'], images: ['array', '[]api.ImageData'], context: ['array', '[]int']
  })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 404, "model '' not found")
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  const prompt: string = body.prompt ?? ''
  if (prompt === '' && !(Array.isArray(body.images) && body.images.length > 0)) {
    // nothing to generate: only load the model, or with keep_alive 0 unload it
    if (keepAliveMs(body.keep_alive) === 0) kit.unload(model)
    else if (!await kit.run(model, body)) return
    const reason = keepAliveMs(body.keep_alive) === 0 ? 'unload' : 'load'
    return okJson(ex, { model, created_at: new Date().toISOString(), response: '', done: true, done_reason: reason })
  }
  if (!await kit.run(model, body)) return
  const turns = (): Turn[] => [...(typeof body.system === 'string' && body.system !== '' ? [{ role: 'system', content: body.system }] : []), { role: 'user', content: prompt }]
  const { words, reason, tokenDelayMs, durations } = await kit.answer(model, turns, promptTokens(prompt), numPredict(body))
  const final = (): Record<string, unknown> => ({
    model,
    created_at: new Date().toISOString(),
    response: '',
    done: true,
    done_reason: reason,
    context: contextTokens(prompt, words.length),
    ...durations()
  })
  if (body.stream === false) {
    await sleep(tokenDelayMs * words.length)
    return okJson(ex, { ...final(), response: words.join('') })
  }
  if (!ex.beginStream(NDJSON_TYPE)) return
  for (const w of words) {
    await sleep(tokenDelayMs)
    if (!ex.line(JSON.stringify({ model, created_at: new Date().toISOString(), response: w, done: false }) + '\n')) return
  }
  ex.endStream(JSON.stringify(final()) + '\n')
}

const chat: Handler = async (kit) => {
  const { ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.ChatRequest', { messages: ['array', '[]api.Message'], tools: ['array', 'api.Tools'] })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 400, 'model is required')
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  const messages: unknown[] = body.messages ?? []
  if (messages.length === 0) {
    if (keepAliveMs(body.keep_alive) === 0) kit.unload(model)
    else if (!await kit.run(model, body)) return
    const reason = keepAliveMs(body.keep_alive) === 0 ? 'unload' : 'load'
    return okJson(ex, { model, created_at: new Date().toISOString(), message: { role: 'assistant', content: '' }, done: true, done_reason: reason })
  }
  if (!await kit.run(model, body)) return
  const { words, reason, tokenDelayMs, durations } = await kit.answer(model, () => chatTurns(messages), promptTokens(messages), numPredict(body))
  const final = (content: string): Record<string, unknown> => ({
    model,
    created_at: new Date().toISOString(),
    message: { role: 'assistant', content },
    done: true,
    done_reason: reason,
    ...durations()
  })
  if (body.stream === false) {
    await sleep(tokenDelayMs * words.length)
    return okJson(ex, final(words.join('')))
  }
  if (!ex.beginStream(NDJSON_TYPE)) return
  for (const w of words) {
    await sleep(tokenDelayMs)
    if (!ex.line(JSON.stringify({ model, created_at: new Date().toISOString(), message: { role: 'assistant', content: w }, done: false }) + '\n')) return
  }
  ex.endStream(JSON.stringify(final('')) + '\n')
}

const embed: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.EmbedRequest', { input: ['any', 'any'], truncate: ['bool', '*bool'], dimensions: ['number', 'int'] })
  if (body === undefined) return
  const input: unknown = body.input
  let inputs: string[]
  if (typeof input === 'string') inputs = input === '' ? [] : [input]
  else if (Array.isArray(input) && input.every(x => typeof x === 'string')) inputs = input
  else if (input === undefined || input === null) inputs = []
  else return errorJson(ex, 400, 'invalid input type')
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 404, "model '' not found")
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  if (inputs.length === 0) return okJson(ex, { model, embeddings: [] })
  const dims = typeof body.dimensions === 'number' && body.dimensions > 0 ? body.dimensions : st.embedDims
  await sleep(st.tokenDelayMs)
  okJson(ex, {
    model,
    embeddings: inputs.map(s => embedVector(s, dims)),
    total_duration: Math.round(st.tokenDelayMs * 1e6) + 1_000_000,
    load_duration: 1_000_000,
    prompt_eval_count: inputs.reduce((n, s) => n + promptTokens(s), 0)
  })
}

const embeddings: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindNative(ex, ctx.text, 'api.EmbeddingRequest', { prompt: ['string', 'string'] })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return errorJson(ex, 400, 'model is required')
  if (!known(model)) return errorJson(ex, 404, `model '${model}' not found`)
  const prompt: string = body.prompt ?? ''
  if (!await kit.run(model, body)) return
  if (prompt === '') return okJson(ex, { embedding: [] })
  await sleep(st.tokenDelayMs)
  okJson(ex, { embedding: embedVector(prompt, st.embedDims) })
}

const v1Chat: Handler = async (kit) => {
  const { ctx, ex, known } = kit
  const body = bindOpenAi(ex, ctx.text, 'openai.ChatCompletionRequest', { messages: ['array', '[]openai.Message'], max_tokens: ['number', '*int'], stream_options: ['object', '*openai.StreamOptions'] })
  if (body === undefined) return
  const messages: unknown[] = body.messages ?? []
  if (messages.length === 0) return v1Error(ex, 400, "[] is too short - 'messages'")
  const model: string = body.model ?? ''
  if (model === '') return v1Error(ex, 400, 'model is required')
  if (!known(model)) return v1Error(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const limit = typeof body.max_tokens === 'number' ? body.max_tokens : undefined
  const { words, reason, tokenDelayMs, openAiUsage } = await kit.answer(model, () => chatTurns(messages), promptTokens(messages), limit)
  const id = `chatcmpl-${randomInt(1000)}`
  const usage = openAiUsage()
  const base = (): Record<string, unknown> => ({ id, object: 'chat.completion.chunk', created: created(), model, system_fingerprint: 'fp_ollama' })
  if (body.stream !== true) {
    await sleep(tokenDelayMs * words.length)
    return okJson(ex, {
      ...base(),
      object: 'chat.completion',
      choices: [{ index: 0, message: { role: 'assistant', content: words.join('') }, finish_reason: reason }],
      usage
    })
  }
  if (!ex.beginStream(SSE_TYPE)) return
  for (const w of words) {
    await sleep(tokenDelayMs)
    if (!ex.line(sse({ ...base(), choices: [{ index: 0, delta: { role: 'assistant', content: w }, finish_reason: null }] }))) return
  }
  if (!ex.line(sse({ ...base(), choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: reason }] }))) return
  if (body.stream_options?.include_usage === true && !ex.line(sse({ ...base(), choices: [], usage }))) return
  ex.endStream('data: [DONE]\n\n')
}

const v1Completions: Handler = async (kit) => {
  const { ctx, ex, known } = kit
  const body = bindOpenAi(ex, ctx.text, 'openai.CompletionRequest', { prompt: ['string', 'string'], max_tokens: ['number', '*int'], stream_options: ['object', '*openai.StreamOptions'] })
  if (body === undefined) return
  const model: string = body.model ?? ''
  if (model === '') return v1Error(ex, 404, "model '' not found")
  if (!known(model)) return v1Error(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const limit = typeof body.max_tokens === 'number' ? body.max_tokens : undefined
  const { words, reason, tokenDelayMs, openAiUsage } = await kit.answer(model, () => [{ role: 'user', content: body.prompt ?? '' }], promptTokens(body.prompt), limit)
  const id = `cmpl-${randomInt(1000)}`
  const usage = openAiUsage()
  const base = (): Record<string, unknown> => ({ id, object: 'text_completion', created: created(), model, system_fingerprint: 'fp_ollama' })
  if (body.stream !== true) {
    await sleep(tokenDelayMs * words.length)
    return okJson(ex, { ...base(), choices: [{ text: words.join(''), index: 0, finish_reason: reason }], usage })
  }
  if (!ex.beginStream(SSE_TYPE)) return
  for (const w of words) {
    await sleep(tokenDelayMs)
    if (!ex.line(sse({ ...base(), choices: [{ text: w, index: 0, finish_reason: null }] }))) return
  }
  if (!ex.line(sse({ ...base(), choices: [{ text: '', index: 0, finish_reason: reason }] }))) return
  if (body.stream_options?.include_usage === true && !ex.line(sse({ ...base(), choices: [], usage }))) return
  ex.endStream('data: [DONE]\n\n')
}

const v1Embeddings: Handler = async (kit) => {
  const { st, ctx, ex, known } = kit
  const body = bindOpenAi(ex, ctx.text, 'openai.EmbedRequest', { input: ['any', 'any'], encoding_format: ['string', 'string'], dimensions: ['number', 'int'] })
  if (body === undefined) return
  const input: unknown = body.input
  let inputs: string[]
  if (typeof input === 'string' && input !== '') inputs = [input]
  else if (Array.isArray(input) && input.length > 0 && input.every(x => typeof x === 'string')) inputs = input
  else return v1Error(ex, 400, 'invalid input')
  const model: string = body.model ?? ''
  if (model === '') return v1Error(ex, 404, "model '' not found")
  if (!known(model)) return v1Error(ex, 404, `model '${model}' not found`)
  if (!await kit.run(model, body)) return
  const dims = typeof body.dimensions === 'number' && body.dimensions > 0 ? body.dimensions : st.embedDims
  const base64 = body.encoding_format === 'base64'
  await sleep(st.tokenDelayMs)
  const tokens = inputs.reduce((n, s) => n + promptTokens(s), 0)
  okJson(ex, {
    object: 'list',
    data: inputs.map((s, index) => {
      const v = embedVector(s, dims)
      return { object: 'embedding', embedding: base64 ? float32Base64(v) : v, index }
    }),
    model,
    usage: { prompt_tokens: tokens, total_tokens: tokens }
  })
}

const work = (path: string, handle: Handler): OllamaRoute => ({ method: 'POST', path, work: true, handle })

const OLLAMA_ROUTES: OllamaRoute[] = [
  ...OLLAMA_INFO_ROUTES,
  work('/api/generate', generate),
  work('/api/chat', chat),
  work('/api/embed', embed),
  work('/api/embeddings', embeddings),
  work('/v1/chat/completions', v1Chat),
  work('/v1/completions', v1Completions),
  work('/v1/embeddings', v1Embeddings)
]

