// The simulator's extra routes speak the real servers' wire formats (no gateway in between).
import t from 'tap'
import { failPulls } from '../scripts/simulator/ollama-extras.js'
import { GpuRecorder, speechBytes, startSimulator, startSpeechSimulator } from './helpers/upstream-simulator.js'

const post = async (url: string, body: unknown): Promise<Response> =>
  await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body) })

t.test('Ollama pull: progress lines as Ollama writes them, a failure as an error line or a 500', async (t) => {
  const sim = await startSimulator({ models: ['llama3.2'], tokenDelayMs: 1 })
  t.teardown(sim.close)
  const res = await post(`${sim.url}/api/pull`, { model: 'qwen3' })
  t.equal(res.headers.get('content-type'), 'application/x-ndjson')
  const lines = (await res.text()).trim().split('\n').map((l) => JSON.parse(l))
  t.same(lines[0], { status: 'pulling manifest' })
  const layer = lines[1]
  t.match(layer, { status: /^pulling [0-9a-f]{12}$/, digest: /^sha256:[0-9a-f]{64}$/, total: Number, completed: Number })
  t.equal(layer.status.slice(8), layer.digest.slice(7, 19), 'the status names the digest\'s first 12 hex digits')
  t.same(lines.slice(-3), [{ status: 'verifying sha256 digest' }, { status: 'writing manifest' }, { status: 'success' }])
  t.ok(((await (await fetch(`${sim.url}/api/tags`)).json()) as { models: Array<{ name: string }> }).models.some((m) => m.name === 'qwen3:latest'), 'listed once pulled')

  failPulls(sim, 'pull model manifest: file does not exist')
  const failed = (await (await post(`${sim.url}/api/pull`, { model: 'nope' })).text()).trim().split('\n').map((l) => JSON.parse(l))
  t.same(failed, [{ status: 'pulling manifest' }, { error: 'pull model manifest: file does not exist' }])
  const once = await post(`${sim.url}/api/pull`, { model: 'nope', stream: false })
  t.equal(once.status, 500)
  t.same(await once.json(), { error: 'pull model manifest: file does not exist' })
  const empty = await post(`${sim.url}/api/pull`, {})
  t.equal(empty.status, 400)
  t.same(await empty.json(), { error: 'model is required' })
})

t.test('Ollama /v1/messages and /v1/responses: errors in each API\'s format, events with their names', async (t) => {
  const recorder = new GpuRecorder()
  const sim = await startSimulator({ models: ['qwen3'], tokens: 2, tokenDelayMs: 1, recorder })
  t.teardown(sim.close)
  const noTokens = await post(`${sim.url}/v1/messages`, { model: 'qwen3', messages: [{ role: 'user', content: 'x' }] })
  t.equal(noTokens.status, 400)
  t.match(await noTokens.json(), { type: 'error', error: { type: 'invalid_request_error', message: 'max_tokens is required and must be positive' } })
  const unknown = await post(`${sim.url}/v1/messages`, { model: 'nope', max_tokens: 5, messages: [{ role: 'user', content: 'x' }] })
  t.equal(unknown.status, 404)
  t.match(await unknown.json(), { type: 'error', error: { type: 'not_found_error' } })
  const stream = await (await post(`${sim.url}/v1/messages`, { model: 'qwen3', max_tokens: 5, stream: true, messages: [{ role: 'user', content: 'x' }] })).text()
  t.same([...stream.matchAll(/^event: (\S+)$/gm)].map((m) => m[1]),
    ['message_start', 'content_block_start', 'content_block_delta', 'content_block_delta', 'content_block_stop', 'message_delta', 'message_stop'])

  const noInput = await post(`${sim.url}/v1/responses`, { model: 'qwen3' })
  t.equal(noInput.status, 400)
  t.match(await noInput.json(), { error: { type: 'invalid_request_error', message: 'input is required' } })
  const events = await (await post(`${sim.url}/v1/responses`, { model: 'qwen3', input: 'x', stream: true })).text()
  const names = [...events.matchAll(/^event: (\S+)$/gm)].map((m) => m[1])
  t.equal(names[0], 'response.created')
  t.equal(names.at(-1), 'response.completed')
  t.equal(names.filter((n) => n === 'response.output_text.delta').length, 2)
  t.equal(recorder.events.filter((e) => e.type === 'start').length, 5, 'each request recorded as model work')
})

t.test('speech server: FastAPI errors, audio bytes, recorded work', async (t) => {
  const recorder = new GpuRecorder()
  const sim = await startSpeechSimulator({ recorder, tokenDelayMs: 4 })
  t.teardown(sim.close)
  const noFile = await fetch(`${sim.url}/v1/audio/transcriptions`, { method: 'POST', body: new FormData() })
  t.equal(noFile.status, 422)
  t.match(await noFile.json(), { detail: [{ type: 'missing', loc: ['body', 'file'] }] })
  const form = new FormData()
  form.set('model', 'whisper-1')
  form.set('response_format', 'text')
  form.set('file', new Blob([Buffer.from('abc')]), 'a.wav')
  const text = await fetch(`${sim.url}/v1/audio/transcriptions`, { method: 'POST', body: form })
  t.match(text.headers.get('content-type'), /^text\/plain/)
  t.match(await text.text(), /^transcript of 3 bytes sha256:/)
  const speech = await post(`${sim.url}/v1/audio/speech`, { model: 'tts-1', input: 'hello', voice: 'alloy', response_format: 'wav' })
  t.equal(speech.headers.get('content-type'), 'audio/wav')
  t.same(Buffer.from(await speech.arrayBuffer()), speechBytes('hello'))
  const badFormat = await post(`${sim.url}/v1/audio/speech`, { model: 'tts-1', input: 'hello', response_format: 'ogg' })
  t.equal(badFormat.status, 422)
  t.equal(recorder.events.filter((e) => e.type === 'start').length, 4)
  t.same(recorder.overlaps, [])
})
