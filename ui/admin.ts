import { el, find, keyed, setText } from './dom.js'

/*
 * Changes to the fleet, through the admin API (`../admin/...`, relative to the page). When the
 * gateway has ADMIN_TOKEN set, the page asks for it first and keeps it in this tab's session
 * storage only. A new API key's secret is shown once, right after it was created, and never again.
 */

const TOKEN_KEY = 'maestro-admin-token'

/** The token (or API key) typed into this tab, if any: the admin calls and the live feed send it. */
export const adminToken = (): string | null => sessionStorage.getItem(TOKEN_KEY)

type Row = Record<string, unknown>

interface Field {
  name: string
  label: string
  type: 'text' | 'number' | 'select' | 'multi' | 'list'
  required?: boolean
  /** for select and multi: [value, label] pairs */
  options?: () => Array<[string, string]>
  /** create only (the record's identity, which PATCH cannot change) */
  fixed?: boolean
  hint?: string
  /** sent only when the rest of the body says so */
  onlyWhen?: (body: Row) => boolean
}

interface Action { label: string, run: (row: Row) => Promise<void> }

interface Resource {
  key: string
  title: string
  singular: string
  path: string
  /** the path of one record, for PATCH and DELETE */
  itemPath: (row: Row) => string
  fields: Field[]
  columns: Array<[string, (row: Row) => string]>
  editable: boolean
  actions?: (row: Row) => Action[]
  /** records listed but past changing */
  frozen?: (row: Row) => boolean
}

const lists: Record<string, Row[]> = {}

const article = (word: string): string => /^[aeiouAEIOU]/.test(word) ? `an ${word}` : `a ${word}`
const text = (v: unknown): string => v == null ? '' : Array.isArray(v) ? v.join(', ') : String(v)
const enc = encodeURIComponent
const tokenCount = new Intl.NumberFormat('en-US')
/** A key's tokens against its budget: "12,345 / 100,000 today", or "12,345 today" with none. */
const tokenUse = (used: unknown, budget: unknown, window: string): string =>
  typeof used !== 'number' ? '' : `${tokenCount.format(used)}${typeof budget === 'number' ? ` / ${tokenCount.format(budget)}` : ''} ${window}`

/** An admin API answer other than 2xx: its status and message. */
export class ApiError extends Error {
  constructor (readonly status: number, message: string) { super(message) }
}

/** A call of the admin API (`../admin/<path>`, relative) with this tab's token, if any. */
export async function api (method: string, path: string, body?: unknown): Promise<unknown> {
  const headers: Record<string, string> = {}
  const token = sessionStorage.getItem(TOKEN_KEY)
  if (token != null) headers.authorization = `Bearer ${token}`
  if (body !== undefined) headers['content-type'] = 'application/json'
  const res = await fetch(`../admin/${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
  const raw = await res.text()
  let parsed: unknown
  try { parsed = raw === '' ? undefined : JSON.parse(raw) } catch { parsed = raw }
  if (!res.ok) {
    const p = parsed as { error?: unknown, message?: unknown } | undefined
    const message = typeof p?.error === 'string' ? p.error : typeof (p?.error as { message?: unknown })?.message === 'string' ? (p?.error as { message: string }).message : typeof p?.message === 'string' ? p.message : `${res.status} ${res.statusText}`
    throw new ApiError(res.status, message)
  }
  return parsed
}

/** A list answer: the array itself, or the first array in an object (`{ computers: [...] }`). */
function rowsOf (answer: unknown): Row[] {
  if (Array.isArray(answer)) return answer as Row[]
  if (answer != null && typeof answer === 'object') {
    for (const v of Object.values(answer)) if (Array.isArray(v)) return v as Row[]
  }
  return []
}

const KINDS: Array<[string, string]> = [['llm', 'LLM (Ollama)'], ['diffusor', 'image (diffusion)'], ['speech', 'speech']]
const PRIORITIES: Array<[string, string]> = [['normal', 'normal'], ['high', 'high'], ['low', 'low']]
const named = (key: string): Array<[string, string]> => (lists[key] ?? []).map((r) => [String(r.id), `${text(r.name)} (#${text(r.id)})`])
const nameOf = (key: string, id: unknown): string => text((lists[key] ?? []).find((r) => String(r.id) === String(id))?.name ?? id)

const RESOURCES: Resource[] = [
  {
    key: 'computers',
    title: 'Computers',
    singular: 'computer',
    path: 'computers',
    itemPath: (r) => `computers/${enc(text(r.id))}`,
    editable: true,
    fields: [
      { name: 'name', label: 'Name', type: 'text', required: true },
      { name: 'ip', label: 'Host name or address', type: 'text', required: true }
    ],
    columns: [['Name', (r) => text(r.name)], ['Address', (r) => text(r.ip)]]
  },
  {
    key: 'gpus',
    title: 'GPUs',
    singular: 'GPU',
    path: 'gpus',
    itemPath: (r) => `gpus/${enc(text(r.id))}`,
    editable: true,
    fields: [
      { name: 'name', label: 'Name', type: 'text', required: true },
      { name: 'computerId', label: 'Computer', type: 'select', required: true, options: () => named('computers') },
      { name: 'vramGb', label: 'VRAM (GB)', type: 'number', required: true },
      { name: 'weight', label: 'Weight', type: 'number', hint: 'higher is chosen first' }
    ],
    columns: [['Name', (r) => text(r.name)], ['Computer', (r) => nameOf('computers', r.computerId)], ['VRAM', (r) => `${text(r.vramGb)} GB`], ['Weight', (r) => text(r.weight)]]
  },
  {
    key: 'models',
    title: 'Models',
    singular: 'model',
    path: 'models',
    itemPath: (r) => `models/${enc(text(r.kind))}/${enc(text(r.name))}`,
    editable: false,
    fields: [
      { name: 'name', label: 'Name', type: 'text', required: true },
      { name: 'kind', label: 'Kind', type: 'select', required: true, options: () => KINDS }
    ],
    columns: [['Name', (r) => text(r.name)], ['Kind', (r) => text(r.kind)]]
  },
  {
    key: 'assignments',
    title: 'Servers',
    singular: 'server',
    path: 'assignments',
    itemPath: (r) => `assignments/${enc(text(r.id))}`,
    editable: true,
    fields: [
      { name: 'name', label: 'Name', type: 'text', required: true },
      { name: 'model', label: 'Model', type: 'text', required: true, hint: 'a model of the list, or * for any' },
      { name: 'port', label: 'Port', type: 'number', required: true },
      { name: 'gpuIds', label: 'GPUs', type: 'multi', required: true, options: () => named('gpus') },
      { name: 'maxParallel', label: 'Requests at once', type: 'number', hint: 'empty: 1' },
      { name: 'kind', label: 'Kind', type: 'select', options: () => KINDS, hint: 'only for * in an inventory file', onlyWhen: (body) => body.model === '*' }
    ],
    columns: [
      ['Name', (r) => text(r.name)], ['Model', (r) => text(r.model)], ['Port', (r) => text(r.port)],
      ['GPUs', (r) => (Array.isArray(r.gpuIds) ? r.gpuIds : []).map((id) => nameOf('gpus', id)).join(', ')],
      ['At once', (r) => text(r.maxParallel ?? 1)], ['Drained', (r) => r.drained === true ? 'yes' : '']
    ],
    actions: (r) => [r.drained === true
      ? { label: 'Undrain', run: async () => { await api('POST', `assignments/${enc(text(r.id))}/undrain`) } }
      : { label: 'Drain', run: async () => { await api('POST', `assignments/${enc(text(r.id))}/drain`) } }]
  },
  {
    key: 'api-keys',
    title: 'API keys',
    singular: 'API key',
    path: 'api-keys',
    itemPath: (r) => `api-keys/${enc(text(r.name))}`,
    editable: true,
    fields: [
      { name: 'name', label: 'Name', type: 'text', required: true, fixed: true },
      { name: 'priority', label: 'Priority', type: 'select', options: () => PRIORITIES },
      { name: 'maxConcurrent', label: 'Requests at once', type: 'number' },
      { name: 'maxQueued', label: 'Waiting at most', type: 'number' },
      { name: 'rpm', label: 'Requests a minute', type: 'number' },
      { name: 'models', label: 'Models allowed', type: 'list', hint: 'comma-separated; empty: all' },
      { name: 'tokensPerDay', label: 'Tokens a day', type: 'number', hint: 'prompt + output, UTC day; empty: no budget' },
      { name: 'tokensPerMonth', label: 'Tokens a month', type: 'number', hint: 'prompt + output, UTC month; empty: no budget' }
    ],
    columns: [
      ['Name', (r) => text(r.name)], ['Priority', (r) => text(r.priority)], ['At once', (r) => text(r.maxConcurrent)],
      ['Queued', (r) => text(r.maxQueued)], ['Per minute', (r) => text(r.rpm)], ['Models', (r) => text(r.models)],
      ['Today', (r) => tokenUse(r.usedToday, r.tokensPerDay, 'today')],
      ['This month', (r) => tokenUse(r.usedThisMonth, r.tokensPerMonth, 'this month')],
      ['State', (r) => r.revokedAt != null ? 'revoked' : 'active']
    ],
    // a revoked key stays listed (its name cannot be used again), and can no longer be changed
    frozen: (r) => r.revokedAt != null
  }
]

/* ------------------------------------------------------------------------------------------ */

function message (root: HTMLElement, words: string, kind: 'ok' | 'error' | '' = ''): void {
  const box = find(root, '.admin-message')
  box.className = `admin-message ${kind}`
  setText(box, words)
}

/**
 * Says that a change was made once the list shows it: the records are fetched and drawn first, so
 * whoever reads the outcome finds the table already saying the same (never the row of before).
 */
async function announceReloaded (root: HTMLElement, resource: Resource, words: string): Promise<void> {
  try {
    await load(root, resource)
  } catch (err) {
    message(root, `${words}, but the list could not be reloaded: ${(err as Error).message}`, 'error')
    return
  }
  message(root, words, 'ok')
}

async function confirmed (question: string): Promise<boolean> {
  const dialog = find<HTMLDialogElement>(document, '#confirm')
  setText(find(dialog, '.confirm-text'), question)
  dialog.returnValue = ''
  dialog.showModal()
  return await new Promise((resolve) => {
    dialog.addEventListener('close', () => { resolve(dialog.returnValue === 'yes') }, { once: true })
  })
}

function input (resource: Resource, field: Field, value: unknown, editing: boolean): HTMLElement {
  const id = `f-${resource.key}-${field.name}`
  let control: HTMLInputElement | HTMLSelectElement
  if (field.type === 'select' || field.type === 'multi') {
    const select = el('select', { id, name: field.name })
    select.multiple = field.type === 'multi'
    if (field.type === 'select' && field.required !== true) select.append(el('option', { value: '', text: '—' }))
    const chosen = new Set((Array.isArray(value) ? value : value == null ? [] : [value]).map(String))
    for (const [v, label] of field.options?.() ?? []) {
      const option = el('option', { value: v, text: label })
      option.selected = chosen.has(v)
      select.append(option)
    }
    control = select
  } else {
    control = el('input', { id, name: field.name, type: field.type === 'number' ? 'number' : 'text', autocomplete: 'off' })
    if (field.type === 'number') control.step = 'any'
    control.value = text(value)
  }
  control.required = field.required === true && !(field.type === 'multi')
  if (editing && field.fixed === true) control.disabled = true
  return el('label', { for: id }, [
    el('span', { class: 'label', text: field.label }),
    control,
    ...(field.hint != null ? [el('small', { text: field.hint })] : [])
  ])
}

/** The JSON body of a form: numbers as numbers, lists as arrays, empty optional fields left out. */
function bodyOf (resource: Resource, form: HTMLFormElement, editing: boolean): Row {
  const body: Row = {}
  for (const field of resource.fields) {
    if (editing && field.fixed === true) continue
    const control = form.elements.namedItem(field.name) as HTMLInputElement | HTMLSelectElement | null
    if (control == null) continue
    if (field.type === 'multi') {
      const ids = Array.from((control as HTMLSelectElement).selectedOptions).map((o) => o.value)
      body[field.name] = ids.map((v) => /^\d+$/.test(v) ? Number(v) : v)
      continue
    }
    const v = control.value.trim()
    if (v === '') continue
    if (field.type === 'number') body[field.name] = Number(v)
    else if (field.type === 'list') body[field.name] = v.split(',').map((s) => s.trim()).filter(Boolean)
    else if (field.name.endsWith('Id') && /^\d+$/.test(v)) body[field.name] = Number(v)
    else body[field.name] = v
  }
  for (const field of resource.fields) if (field.onlyWhen != null && !field.onlyWhen(body)) delete body[field.name]
  return body
}

function showSecret (root: HTMLElement, name: string, key: string): void {
  const box = find(root, '.admin-secret')
  box.hidden = false
  box.replaceChildren(
    el('p', { text: `The key for ${name}. It is shown this once: copy it now.` }),
    el('code', { class: 'secret', text: key }),
    el('button', { type: 'button', class: 'copy', text: 'Copy' }),
    el('button', { type: 'button', class: 'dismiss', text: 'Done' })
  )
  find(box, '.copy').addEventListener('click', () => {
    void navigator.clipboard?.writeText(key).then(() => { setText(find(box, '.copy'), 'Copied') }, () => {
      // not a secure context: select it for the operator to copy
      const range = document.createRange()
      range.selectNodeContents(find(box, '.secret'))
      getSelection()?.removeAllRanges()
      getSelection()?.addRange(range)
    })
  })
  find(box, '.dismiss').addEventListener('click', () => { box.replaceChildren(); box.hidden = true })
}

function openForm (root: HTMLElement, resource: Resource, row?: Row): void {
  const editing = row !== undefined
  const form = el('form', { class: 'admin-form', 'data-resource': resource.key })
  form.append(
    el('h3', { text: editing ? `Edit ${resource.singular} ${text(row.name)}` : `Add ${article(resource.singular)}` }),
    ...resource.fields.map((f) => input(resource, f, row?.[f.name], editing)),
    el('div', { class: 'buttons' }, [
      el('button', { type: 'submit', class: 'primary', text: editing ? 'Save' : 'Add' }),
      el('button', { type: 'button', class: 'cancel', text: 'Cancel' })
    ])
  )
  const holder = find(root, '.admin-form-holder')
  holder.replaceChildren(form)
  find(form, '.cancel').addEventListener('click', () => { holder.replaceChildren() })
  form.addEventListener('submit', (event) => {
    event.preventDefault()
    const body = bodyOf(resource, form, editing)
    const work = editing ? api('PATCH', resource.itemPath(row), body) : api('POST', resource.path, body)
    work.then(async (answer) => {
      holder.replaceChildren()
      // the secret at once: it is shown this once, whatever the reload does
      const key = (answer as { key?: unknown } | undefined)?.key
      if (!editing && typeof key === 'string') showSecret(root, text(body.name), key)
      await announceReloaded(root, resource, editing ? `${resource.singular} saved` : `${resource.singular} added`)
    }, (err: Error) => { message(root, err.message, 'error') })
  })
  const first = form.querySelector<HTMLElement>('input:not([disabled]), select')
  first?.focus()
}

function renderList (root: HTMLElement, resource: Resource): void {
  const table = find(root, `.admin-table[data-resource="${resource.key}"]`)
  const head = find(table, 'thead tr')
  if (head.childElementCount === 0) {
    for (const [label] of resource.columns) head.append(el('th', { text: label }))
    head.append(el('th', { text: '' }))
  }
  const rows = lists[resource.key] ?? []
  keyed(find(table, 'tbody'), rows, (r) => text(r.id ?? `${text(r.kind)}/${text(r.name)}`), () => el('tr'), (tr, r) => {
    const cells = resource.columns.map(([, value]) => el('td', { text: value(r) }))
    const buttons = el('td', { class: 'row-actions' })
    if (resource.frozen?.(r) === true) {
      tr.replaceChildren(...cells, buttons)
      return
    }
    if (resource.editable) {
      const edit = el('button', { type: 'button', text: 'Edit' })
      edit.addEventListener('click', () => { openForm(root, resource, r) })
      buttons.append(edit)
    }
    for (const action of resource.actions?.(r) ?? []) {
      const b = el('button', { type: 'button', text: action.label })
      b.addEventListener('click', () => {
        action.run(r).then(async () => { await announceReloaded(root, resource, `${action.label}: ${text(r.name)} done`) },
          (err: Error) => { message(root, err.message, 'error') })
      })
      buttons.append(b)
    }
    const remove = el('button', { type: 'button', class: 'danger', text: resource.key === 'api-keys' ? 'Revoke' : 'Remove' })
    remove.addEventListener('click', () => {
      void confirmed(`${resource.key === 'api-keys' ? 'Revoke' : 'Remove'} ${resource.singular} “${text(r.name)}”? This cannot be undone.`).then(async (yes) => {
        if (!yes) return
        try {
          await api('DELETE', resource.itemPath(r))
        } catch (err) {
          message(root, (err as Error).message, 'error')
          return
        }
        await announceReloaded(root, resource, `${resource.singular} ${text(r.name)} ${resource.key === 'api-keys' ? 'revoked' : 'removed'}`)
      })
    })
    buttons.append(remove)
    tr.replaceChildren(...cells, buttons)
  })
}

async function load (root: HTMLElement, resource: Resource): Promise<void> {
  lists[resource.key] = rowsOf(await api('GET', resource.path))
  renderList(root, resource)
}

async function loadAll (root: HTMLElement): Promise<void> {
  await Promise.all(offered.map(async (r) => { await load(root, r) }))
}

function build (root: HTMLElement): void {
  const tabs = find(root, '.admin-tabs')
  const panes = find(root, '.admin-panes')
  for (const resource of offered) {
    const tab = el('button', { type: 'button', class: 'tab', 'data-tab': resource.key, text: resource.title })
    const add = el('button', { type: 'button', class: 'primary add', text: `Add ${article(resource.singular)}` })
    const pane = el('div', { class: 'admin-pane', 'data-pane': resource.key }, [
      add,
      el('div', { class: 'table-wrap' }, [el('table', { class: 'admin-table', 'data-resource': resource.key }, [el('thead', {}, [el('tr')]), el('tbody')])])
    ])
    pane.hidden = resource !== offered[0]
    tab.setAttribute('aria-selected', String(resource === offered[0]))
    tab.addEventListener('click', () => {
      for (const p of Array.from(panes.children) as HTMLElement[]) p.hidden = p.dataset.pane !== resource.key
      for (const t of Array.from(tabs.children)) t.setAttribute('aria-selected', String((t as HTMLElement).dataset.tab === resource.key))
      find(root, '.admin-form-holder').replaceChildren()
    })
    add.addEventListener('click', () => { openForm(root, resource) })
    tabs.append(tab)
    panes.append(pane)
  }
}

/**
 * Offers the changes once the admin API answers; asks for the token when it wants one.
 * `tokenChanged` is told whenever the tab's token is set or forgotten.
 */
export function startAdmin (tokenChanged: () => void): void {
  const root = find(document, '#admin')
  const toggle = find<HTMLButtonElement>(document, '#admin-toggle')
  const login = find<HTMLFormElement>(document, '#token-form')
  let built = false

  const askToken = (refused: boolean): void => {
    root.hidden = true
    login.hidden = false
    setText(find(login, '.token-message'), refused ? 'That token was refused.' : 'This gateway needs its admin token for changes.')
    find<HTMLInputElement>(login, 'input').focus()
  }

  const open = async (): Promise<void> => {
    if (needsToken && sessionStorage.getItem(TOKEN_KEY) == null) {
      askToken(false)
      return
    }
    try {
      await loadAll(root)
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        const refused = sessionStorage.getItem(TOKEN_KEY) != null
        sessionStorage.removeItem(TOKEN_KEY)
        tokenChanged()
        askToken(refused)
        return
      }
      message(root, (err as Error).message, 'error')
    }
    login.hidden = true
    root.hidden = false
    setText(toggle, 'Close editing')
  }

  toggle.addEventListener('click', () => {
    if (!root.hidden || !login.hidden) {
      root.hidden = true
      login.hidden = true
      setText(toggle, 'Edit fleet')
      return
    }
    if (!built) { build(root); built = true }
    void open()
  })
  login.addEventListener('submit', (event) => {
    event.preventDefault()
    const field = find<HTMLInputElement>(login, 'input')
    sessionStorage.setItem(TOKEN_KEY, field.value)
    field.value = ''
    tokenChanged()
    void open()
  })
  find(login, '.cancel').addEventListener('click', () => { login.hidden = true; setText(toggle, 'Edit fleet') })
  find(document, '#logout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY)
    tokenChanged()
    root.hidden = true
    setText(toggle, 'Edit fleet')
  })

}

let needsToken = false
/** The record kinds this gateway's admin API has (the snapshot says). */
let offered: Resource[] = []

/** Shows the way to changes where the gateway has the admin API. */
export function offerAdmin (admin: { resources: string[], token?: boolean }): void {
  offered = RESOURCES.filter((r) => admin.resources.includes(r.path))
  find(document, '#admin-toggle').hidden = offered.length === 0
  // unknown without the admin token: then the admin API's 401 asks for it
  needsToken = admin.token === true
}
