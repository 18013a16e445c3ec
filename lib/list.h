/*
 * list: an intrusive doubly linked list (registries of live sessions).
 *
 * A node is embedded in the object it lists and points back at it
 * (owner), so a module can walk a list of objects whose struct it cannot
 * see. The list owns nothing: inserting or removing never allocates or
 * frees. A node is on at most one list at a time; removing it while
 * walking is safe when the walker saved node->next first.
 */
#ifndef MF_LIST_H
#define MF_LIST_H

#include <stddef.h>

struct list_node {
    struct list_node *next, *prev;
    void *owner;                  /* the object the node is embedded in */
};

struct list {
    struct list_node *head;       /* NULL when empty */
};

#define LIST_INIT {NULL}

/* Puts n, embedded in owner, at the head of l. O(1). */
static inline void list_push(struct list *l, struct list_node *n, void *owner)
{
    n->owner = owner;
    n->prev = NULL;
    n->next = l->head;
    if (l->head)
        l->head->prev = n;
    l->head = n;
}

/* Takes n off l (a node not on l is left alone). O(1). */
static inline void list_remove(struct list *l, struct list_node *n)
{
    if (n->prev)
        n->prev->next = n->next;
    else if (l->head == n)
        l->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    n->next = n->prev = NULL;
}

#endif
