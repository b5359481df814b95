/** Small DOM helpers: the page is updated in place, record by record, never rebuilt. */

type Attrs = Record<string, string | undefined> & { class?: string, text?: string }

export function el<K extends keyof HTMLElementTagNameMap> (tag: K, attrs: Attrs = {}, children: Array<Node | string> = []): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag)
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined) continue
    if (name === 'text') node.textContent = value
    else if (name === 'class') node.className = value
    else node.setAttribute(name, value)
  }
  for (const child of children) node.append(child)
  return node
}

/** Changes the text only when it differs (no needless layout, no flicker). */
export function setText (node: Element, text: string): void {
  if (node.textContent !== text) node.textContent = text
}

export function setClass (node: Element, className: string): void {
  if (node.className !== className) node.className = className
}

export function setAttr (node: Element, name: string, value: string | undefined): void {
  if (value === undefined) node.removeAttribute(name)
  else if (node.getAttribute(name) !== value) node.setAttribute(name, value)
}

/** The element under `root` that must exist (the page's own markup). */
export function find<T extends Element = HTMLElement> (root: ParentNode, selector: string): T {
  const node = root.querySelector<T>(selector)
  if (node == null) throw new Error(`missing element ${selector}`)
  return node
}

/**
 * Makes `container`'s children show `items`, in order, one element per key: an element whose key
 * is still there is kept and updated, new keys get a new element, gone keys lose theirs.
 */
export function keyed<T> (container: Element, items: T[], key: (item: T) => string, create: (item: T) => HTMLElement, update: (node: HTMLElement, item: T) => void): void {
  const existing = new Map<string, HTMLElement>()
  for (const child of Array.from(container.children)) {
    const k = (child as HTMLElement).dataset.key
    if (k !== undefined) existing.set(k, child as HTMLElement)
  }
  let cursor: Element | null = container.firstElementChild
  // skip elements that are not keyed (a table's header row kept in the same parent, say)
  while (cursor != null && (cursor as HTMLElement).dataset.key === undefined) cursor = cursor.nextElementSibling
  for (const item of items) {
    const k = key(item)
    let node = existing.get(k)
    if (node === undefined) {
      node = create(item)
      node.dataset.key = k
    } else {
      existing.delete(k)
    }
    update(node, item)
    if (node !== cursor) container.insertBefore(node, cursor)
    else cursor = cursor.nextElementSibling
  }
  for (const gone of existing.values()) gone.remove()
}

/** "12 s", "4 min", "2 h 5 min" */
export function duration (ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000))
  if (s < 60) return `${s} s`
  const min = Math.floor(s / 60)
  if (min < 60) return `${min} min`
  const h = Math.floor(min / 60)
  return `${h} h ${min % 60} min`
}

export function clock (iso: string): string {
  const d = new Date(iso)
  if (Number.isNaN(d.getTime())) return iso
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
}
